"""Renderer `ansible`: the role variables a Debian node's roles read, from its profile."""

from __future__ import annotations

from pathlib import Path

from ruamel.yaml import YAML

from sovereign.profile.loader import load_profile, parse_profile
from sovereign.render import render_files
from sovereign.render.ansible import role_variables

ROOT = Path(__file__).resolve().parents[3]


def test_the_air_gapped_allowlist_holds_addresses_not_names() -> None:
    variables = role_variables(load_profile(ROOT / "profiles/air-gapped.yaml"))

    assert variables["egress_lockdown_allow"] == [
        {
            "address": "10.88.0.10",
            "port": 443,
            "protocol": "tcp",
            "description": "the local PyPI, OCI, Debian and model mirror imported from USB bundles",
        },
        {
            "address": "10.88.0.0/24",
            "port": None,
            "protocol": "tcp",
            "description": "the other ward nodes, over the mesh only",
        },
    ]
    assert variables["egress_lockdown_mesh_port"] == 51820
    assert variables["egress_lockdown_mesh_peers"] == [{"address": "172.20.4.12", "port": 51820}]
    assert variables["egress_lockdown_admin_networks"] == ["10.88.0.0/24"]
    assert variables["base_hardening_hosts"] == {"mirror.ward.internal": "10.88.0.10"}
    assert variables["disk_encryption_tpm_pcrs"] == [7]
    assert variables["tpm_attestation_pcrs"] == [0, 2, 4, 7]
    assert variables["sandbox_runtime_default"] == "gvisor"
    assert variables["gateway_node_ip_allow"] == ["localhost", "10.88.0.10", "10.88.0.0/24"]


def test_every_variable_carries_its_roles_prefix() -> None:
    variables = role_variables(load_profile(ROOT / "profiles/air-gapped.yaml"))
    prefixes = ("base_hardening_", "egress_lockdown_", "sandbox_runtime_", "gateway_node_",
                "disk_encryption_", "tpm_attestation_", "sovereign_")  # fmt: skip
    assert all(name.startswith(prefixes) for name in variables)
    for name in variables:
        role = next(p for p in prefixes if name.startswith(p)).rstrip("_")
        if role != "sovereign":
            assert (ROOT / "roles" / role / "meta/argument_specs.yml").read_text().count(
                name
            ) >= 1, name


def test_a_node_without_a_tpm_gets_no_tpm_roles() -> None:
    profile = parse_profile(
        "kind: personal\nname: t\nnodes:\n  - name: a\n    tpm: none\n", "t.yaml"
    )
    variables = role_variables(profile)
    assert variables["disk_encryption_enabled"] is False
    assert variables["tpm_attestation_enabled"] is False
    assert variables["egress_lockdown_mesh_port"] is None


def test_the_rendered_files_are_the_inventory_and_group_vars() -> None:
    files = render_files(load_profile(ROOT / "profiles/air-gapped.yaml"), ["ansible"])
    yaml = YAML(typ="safe")
    inventory = yaml.load(files["ansible/inventory.yml"])
    group_vars = yaml.load(files["ansible/group_vars/all.yml"])

    assert inventory == {"sovereign": {"hosts": {"ward-gpu-01": {}}}}
    assert group_vars["sovereign_profile"] == "radiology-ward"


def test_a_talos_node_gets_no_ansible_files() -> None:
    profile = parse_profile("kind: edge\nname: t\nhost:\n  os: talos\n", "t.yaml")
    assert render_files(profile, ["ansible"]) == {}
