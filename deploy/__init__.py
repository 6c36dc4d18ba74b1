"""Deployment tooling: the `lance-serve` command line and the KubeRay manifests.

    cli.py             `lance-serve COMMAND`: the table of commands; each is configured only when chosen
    k8s_cli.py         `lance-serve k8s render | check`
    k8s_render.py      a RayService manifest from a stage graph and the Serve config
    k8s_check.py       offline checks of a manifest (CRD, Serve config, stage graph, group resources)
    checkpoint_cli.py  `lance-serve make-tiny-checkpoint | check-checkpoint` (the model's own tools)

Imports run one way: deploy -> serve_app's pure modules (stage_graph, app_config) -> nothing heavy.
Rendering and checking a manifest import neither torch, vLLM nor the Ray Serve runtime (only Ray
Serve's config schema, to check serveConfigV2 by Ray's own rules); the checkpoint commands import the
model core (stages/) inside the command. tests/test_import_contract.py holds this.
"""
