import pulumi_kubernetes as k8s

from tests.stacks.harness import synth


def test_smoke():
    def build(settings):
        k8s.core.v1.Namespace("x", metadata={"name": settings.cluster.stack})

    res = synth(build)
    assert res[0].manifest()["metadata"]["name"] == "datacenter"
    res = synth(build)
    assert len(res) == 1
