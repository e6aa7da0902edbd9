"""Where a model's weights live on the node, from the `source` URI in the profile.

Takes `pkg:<tool>/<file>`, `bundle:<path>`, `file:/<path>` or `hf:<org>/<repo>@<commit>/<file>`;
gives an absolute path. `pkg:` resolves into this machine's tools cache (`sovereign tools
install`), so a profile that uses it renders for the machine it is rendered on.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from sovereign import tools
from sovereign.profile.derived import BUNDLE_ROOT, local_weights_path


class UnknownSource(ValueError):
    pass


def weights_path(source: str) -> str:
    scheme, _, rest = source.partition(":")
    if scheme in ("file", "bundle"):
        return local_weights_path(source)
    if scheme == "hf":
        repo, _, path = rest.partition("/")
        name, _, tail = path.partition("/")
        repo_name, _, commit = name.partition("@")
        file = tail
        return str(PurePosixPath(BUNDLE_ROOT) / "hf" / repo / repo_name / commit / file)
    if scheme == "pkg":
        tool_name, _, file = rest.partition("/")
        tool = tools.REGISTRY.get(tool_name)
        if not isinstance(tool, tools.CachedTool) or not file:
            known = ", ".join(
                n for n, t in tools.REGISTRY.items() if isinstance(t, tools.CachedTool)
            )
            raise UnknownSource(f"{source!r}: pkg: names a pinned component ({known}) and a file")
        return str(tool.path(tools.tools_dir()) / file)
    raise UnknownSource(f"{source!r} is not a weights URI (pkg:, bundle:, file:, hf:)")
