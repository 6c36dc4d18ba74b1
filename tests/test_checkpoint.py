"""Checkpoint resolution, lazy safetensors access, strict key accounting, and make-tiny-checkpoint."""
from __future__ import annotations

import fnmatch
import json
import math
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.lance.checkpoint import (
    CheckpointKeyError, SafetensorsFile, check_checkpoint, check_keys, check_model_file,
    expected_llm_tensor_shapes, expected_model_file_tensor_shapes, expected_vit_tensor_shapes,
    hub_allow_patterns, load_lance_config, load_tokenizer, resolve_checkpoint,
)
from deploy.cli import COMMANDS, main as cli_main
from stages.lance.config import LanceConfig
from stages.lance.tiny import TinyCheckpointSpec, make_tiny_checkpoint

DATA = Path(__file__).parent / "data"

# Files of the hub repo (spec §1.1; tokenizer file names as in the golden tiny checkpoint).
HUB_REPO_FILES = [
    "config.json", "Wan2.2_VAE.pth", "Qwen2.5-VL-ViT/config.json", "Qwen2.5-VL-ViT/vit.safetensors",
    *(f"{v}/{f}" for v in ("Lance_3B", "Lance_3B_Video") for f in (
        "model.safetensors", "llm_config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.json", "merges.txt")),
]


def real_config(variant: str = "Lance_3B") -> LanceConfig:
    return LanceConfig.from_llm_config_file(DATA / "lance_3b_llm_config.json", variant=variant)


def real_vit_config() -> dict:
    return json.loads((DATA / "qwen2_5_vl_vit_config.json").read_text())


def spec_lance_3b_table() -> dict[str, tuple[int, ...]]:
    """Spec §1.2, written out by hand from its tables (independent of the generator)."""
    table = {
        "language_model.model.embed_tokens.weight": (151936, 2048),
        "language_model.model.norm.weight": (2048,),
        "language_model.model.norm_moe_gen.weight": (2048,),
        "language_model.lm_head.weight": (151936, 2048),
        "time_embedder.mlp.0.weight": (2048, 256), "time_embedder.mlp.0.bias": (2048,),
        "time_embedder.mlp.2.weight": (2048, 2048), "time_embedder.mlp.2.bias": (2048,),
        "vae2llm.weight": (2048, 48), "vae2llm.bias": (2048,),
        "llm2vae.weight": (48, 2048), "llm2vae.bias": (48,),
        "latent_pos_embed.pos_embed": (4096, 2048),
    }
    rows = [  # (und name, gen name, shape)
        ("self_attn.q_proj.weight", "self_attn.q_proj_moe_gen.weight", (2048, 2048)),
        ("self_attn.q_proj.bias", "self_attn.q_proj_moe_gen.bias", (2048,)),
        ("self_attn.k_proj.weight", "self_attn.k_proj_moe_gen.weight", (256, 2048)),
        ("self_attn.k_proj.bias", "self_attn.k_proj_moe_gen.bias", (256,)),
        ("self_attn.v_proj.weight", "self_attn.v_proj_moe_gen.weight", (256, 2048)),
        ("self_attn.v_proj.bias", "self_attn.v_proj_moe_gen.bias", (256,)),
        ("self_attn.o_proj.weight", "self_attn.o_proj_moe_gen.weight", (2048, 2048)),
        ("self_attn.q_norm.weight", "self_attn.q_norm_moe_gen.weight", (128,)),
        ("self_attn.k_norm.weight", "self_attn.k_norm_moe_gen.weight", (128,)),
        ("mlp.gate_proj.weight", "mlp_moe_gen.gate_proj.weight", (11008, 2048)),
        ("mlp.up_proj.weight", "mlp_moe_gen.up_proj.weight", (11008, 2048)),
        ("mlp.down_proj.weight", "mlp_moe_gen.down_proj.weight", (2048, 11008)),
        ("input_layernorm.weight", "input_layernorm_moe_gen.weight", (2048,)),
        ("post_attention_layernorm.weight", "post_attention_layernorm_moe_gen.weight", (2048,)),
    ]
    for layer in range(36):
        for und, gen, shape in rows:
            table[f"language_model.model.layers.{layer}.{und}"] = shape
            table[f"language_model.model.layers.{layer}.{gen}"] = shape
    return table


@pytest.fixture(scope="module")
def golden_files(tiny_ckpt_dir):
    return resolve_checkpoint(tiny_ckpt_dir)


@pytest.fixture(scope="module")
def made_default(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_default"),
                                TinyCheckpointSpec(variants=("Lance_3B", "Lance_3B_Video")))


# ----------------------------------------------------------------------------------------------------
# The golden tiny checkpoint
# ----------------------------------------------------------------------------------------------------
def test_golden_tiny_checkpoint_accounts_for_every_tensor(golden_files):
    report = check_checkpoint(golden_files)
    assert report.ok, str(report)
    assert (report.model.matched, report.vit.matched, report.vae.matched) == (69, 30, 196)
    for part in report.parts:
        assert part.missing == part.unexpected == part.wrong_shape == ()
    # the image variant has no ViT copy of its own: the only allowance used is vit_model.*
    assert len(report.model.allowed_missing) == 30
    assert all(n.startswith("vit_model.") for n in report.model.allowed_missing)
    assert report.model.allowed_unexpected == ()


def test_check_checkpoint_cli_covers_the_video_variant(tiny_ckpt_dir, tmp_path, capsys):
    assert cli_main(["check-checkpoint", str(tiny_ckpt_dir), "--variant", "Lance_3B_Video"]) == 0
    out = capsys.readouterr().out
    # 69 LLM tensors + 30 vit_model.* (all required in the video file; real: 1021 + 390 = 1411)
    assert "Lance_3B_Video/model.safetensors: 99 tensors matched, 0 missing, 0 unexpected" in out
    # A video file without its own ViT copy is reported, not accepted.
    shutil.copytree(tiny_ckpt_dir, tmp_path / "ckpt", ignore=shutil.ignore_patterns("Lance_3B"))
    weights = tmp_path / "ckpt" / "Lance_3B_Video" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if not k.startswith("vit_model.")}, str(weights))
    assert cli_main(["check-checkpoint", str(tmp_path / "ckpt"), "--variant", "Lance_3B_Video"]) == 1
    assert "69 tensors matched, 30 missing" in capsys.readouterr().out


def test_golden_config_and_tokenizer_load(golden_files):
    cfg = load_lance_config(golden_files)
    assert (cfg.llm.hidden_size, cfg.llm.head_dim, cfg.llm.num_key_value_heads) == (128, 64, 1)
    assert cfg.llm.mrope_section == (8, 12, 12) and cfg.variant == "Lance_3B"
    tokenizer = load_tokenizer(golden_files)
    assert len(tokenizer) == 998
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|video_pad|>"]) == [977, 989]


def test_safetensors_file_reads_header_lazily_and_tensors_on_demand(golden_files):
    with SafetensorsFile(golden_files.llm_weights_path) as f:
        assert len(f) == 69 and "vae2llm.weight" in f
        assert f.shape("latent_pos_embed.pos_embed") == (4096, 128)
        assert f.dtype("vae2llm.weight") == torch.float32
        t = f.get("vae2llm.weight", dtype=torch.bfloat16)
        assert t.dtype == torch.bfloat16 and t.shape == (128, 48)
        assert torch.equal(t, load_file(str(f.path))["vae2llm.weight"].to(torch.bfloat16))
        with pytest.raises(KeyError, match="no tensor 'nope'"):
            f.get("nope")


def test_corrupt_safetensors_header_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        SafetensorsFile(bad)


# ----------------------------------------------------------------------------------------------------
# Expected names and shapes of the real checkpoint (no weights allocated)
# ----------------------------------------------------------------------------------------------------
def test_real_lance_3b_expected_tensors_match_spec_table():
    shapes = expected_llm_tensor_shapes(real_config("Lance_3B"))
    assert len(shapes) == 1021
    assert shapes == spec_lance_3b_table()
    # spec §1.2: 77,077,248 parameters per expert per layer, ~6.19 B in all
    layer0 = {n: s for n, s in shapes.items() if n.startswith("language_model.model.layers.0.")}
    assert sum(math.prod(s) for n, s in layer0.items() if "_moe_gen" not in n) == 77_077_248
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e9, 2) == 6.19


def test_real_lance_3b_video_expects_3d_pos_table_and_its_own_vit():
    shapes = expected_model_file_tensor_shapes(real_config("Lance_3B_Video"), real_vit_config())
    vit = {n: s for n, s in shapes.items() if n.startswith("vit_model.")}
    assert len(shapes) == 1411 and len(vit) == 390
    assert shapes["latent_pos_embed.pos_embed"] == (126976, 2048)  # 31 x 64 x 64
    assert vit["vit_model.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert vit["vit_model.merger.mlp.2.weight"] == (2048, 5120)
    assert len([n for n in vit if n.startswith("vit_model.blocks.")]) == 32 * 12
    assert round(sum(math.prod(s) for s in vit.values()) / 1e9, 2) == 0.67
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e9, 2) == 7.11


# ----------------------------------------------------------------------------------------------------
# Key accounting
# ----------------------------------------------------------------------------------------------------
def test_check_keys_names_missing_unexpected_and_wrong_shapes():
    expected = {"a.weight": (2, 3), "b.weight": (4,), "c.weight": (5,)}
    present = {"a.weight": (3, 2), "b.weight": (4,), "extra.bias": (1,)}
    with pytest.raises(CheckpointKeyError) as err:
        check_keys(present, expected, source="model.safetensors")
    message = str(err.value)
    assert "model.safetensors" in message
    assert "missing:\n    c.weight" in message
    assert "unexpected:\n    extra.bias" in message
    assert "a.weight: found [3, 2], expected [2, 3]" in message
    report = err.value.report
    assert (report.missing, report.unexpected, report.matched) == (("c.weight",), ("extra.bias",), 1)


def test_check_keys_allows_only_the_given_prefixes():
    report = check_keys(["a", "vit_model.x"], ["a", "b.y"], allowed_missing=("b.",), allowed_unexpected=("vit_model.",))
    assert report.ok and report.allowed_missing == ("b.y",) and report.allowed_unexpected == ("vit_model.x",)
    with pytest.raises(CheckpointKeyError, match="b.y"):
        check_keys(["a"], ["a", "b.y"], allowed_missing=("c.",))


def test_model_file_with_a_missing_and_an_unexpected_tensor_is_rejected(tmp_path, capsys, golden_files):
    root = tmp_path / "ckpt"
    shutil.copytree(golden_files.root, root)
    path = root / "Lance_3B" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"]
    tensors["connector.fc1.weight"] = torch.zeros(2, 2)
    path.unlink()
    save_file(tensors, str(path))
    with pytest.raises(CheckpointKeyError) as err:
        check_model_file(resolve_checkpoint(root))
    assert "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight" in str(err.value)
    assert "connector.fc1.weight" in str(err.value)
    assert cli_main(["check-checkpoint", str(root)]) == 1
    out = capsys.readouterr().out
    assert "1 missing, 1 unexpected" in out and "connector.fc1.weight" in out
    assert "Wan2.2_VAE.pth: 196 tensors matched, 0 missing" in out


def test_check_checkpoint_cli_passes_the_golden(capsys, tiny_ckpt_dir):
    assert cli_main(["check-checkpoint", str(tiny_ckpt_dir / "Lance_3B")]) == 0
    assert "Lance_3B/model.safetensors: 69 tensors matched, 0 missing, 0 unexpected" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Resolution: local paths never touch the network; hub ids download only the variant's files
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was called for a local checkpoint")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_local_root_and_variant_dir_resolve_without_the_hub(no_hub, tiny_ckpt_dir):
    from_root = resolve_checkpoint(tiny_ckpt_dir)
    from_variant_dir = resolve_checkpoint(tiny_ckpt_dir / "Lance_3B")
    assert from_root == from_variant_dir
    assert from_root.llm_dir == tiny_ckpt_dir.resolve() / "Lance_3B"
    assert from_root.vit_dir.name == "Qwen2.5-VL-ViT" and from_root.vae_path.name == "Wan2.2_VAE.pth"
    assert from_root.repo_id is None


def test_local_resolution_errors_name_what_is_missing(no_hub, tmp_path, tiny_ckpt_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing" / "dir")
    # A checkpoint folder that holds only the image variant: asking for the video one names what is there.
    image_only = tmp_path / "image_only"
    image_only.mkdir()
    for entry in tiny_ckpt_dir.iterdir():
        if entry.name != "Lance_3B_Video":
            (image_only / entry.name).symlink_to(entry)
    with pytest.raises(FileNotFoundError, match=r"no Lance_3B_Video/llm_config.json.*\['Lance_3B'\]"):
        resolve_checkpoint(image_only, variant="Lance_3B_Video")
    assert resolve_checkpoint(tiny_ckpt_dir, variant="Lance_3B_Video").variant == "Lance_3B_Video"
    with pytest.raises(ValueError, match="is the Lance_3B variant"):
        resolve_checkpoint(tiny_ckpt_dir / "Lance_3B", variant="Lance_3B_Video")
    with pytest.raises(ValueError, match="unknown Lance variant"):
        resolve_checkpoint(tiny_ckpt_dir, variant="Lance_7B")
    only_llm = tmp_path / "only_llm"
    shutil.copytree(tiny_ckpt_dir / "Lance_3B", only_llm / "Lance_3B")
    with pytest.raises(FileNotFoundError, match="Qwen2.5-VL-ViT"):
        resolve_checkpoint(only_llm)
    files = resolve_checkpoint(only_llm, need_vit=False, need_vae=False)
    assert files.vit_dir is None and files.vae_path is None


@pytest.mark.parametrize("variant,other", [("Lance_3B", "Lance_3B_Video"), ("Lance_3B_Video", "Lance_3B")])
def test_hub_allow_patterns_select_exactly_the_variant_files(variant, other):
    def selected(patterns):
        return {f for f in HUB_REPO_FILES if any(fnmatch.fnmatch(f, p) for p in patterns)}

    everything = selected(hub_allow_patterns(variant))
    assert everything == {f for f in HUB_REPO_FILES if not f.startswith(other + "/")}
    assert selected(hub_allow_patterns(variant, need_vit=False, need_vae=False)) == {
        f for f in HUB_REPO_FILES if f.startswith(variant + "/") or f == "config.json"}


def test_hub_repo_id_downloads_with_allow_patterns(monkeypatch, tiny_ckpt_dir):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny_ckpt_dir)  # stands in for the hub cache snapshot folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    files = resolve_checkpoint("bytedance-research/Lance", need_vae=False)
    assert files.repo_id == "bytedance-research/Lance" and files.variant == "Lance_3B"
    assert files.llm_dir == tiny_ckpt_dir.resolve() / "Lance_3B"
    [(repo_id, kwargs)] = calls
    assert repo_id == "bytedance-research/Lance"
    assert kwargs["allow_patterns"] == hub_allow_patterns("Lance_3B", need_vit=True, need_vae=False)


# ----------------------------------------------------------------------------------------------------
# make-tiny-checkpoint
# ----------------------------------------------------------------------------------------------------
def test_make_tiny_default_reproduces_the_golden_checkpoint_bit_for_bit(made_default, golden_files):
    for rel in ("Lance_3B/model.safetensors", "Lance_3B_Video/model.safetensors", "Qwen2.5-VL-ViT/vit.safetensors"):
        made, golden = load_file(str(made_default.root / rel)), load_file(str(golden_files.root / rel))
        assert made.keys() == golden.keys(), rel
        assert all(torch.equal(made[k], golden[k]) for k in golden), rel
    made_vae = torch.load(made_default.vae_path, weights_only=True)
    golden_vae = torch.load(golden_files.vae_path, weights_only=True)
    assert made_vae.keys() == golden_vae.keys()
    assert all(torch.equal(made_vae[k], golden_vae[k]) for k in golden_vae)
    for rel in ("Lance_3B/llm_config.json", "Lance_3B_Video/llm_config.json", "Qwen2.5-VL-ViT/config.json",
                "Lance_3B/generation_config.json"):
        made, golden = (json.loads((r / rel).read_text()) for r in (made_default.root, golden_files.root))
        golden.pop("transformers_version", None)
        assert made == golden, rel
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (made_default.llm_dir / name).read_bytes() == (golden_files.llm_dir / name).read_bytes()


def test_make_tiny_cli_non_default_geometry_loads_cleanly(tmp_path, capsys):
    out = tmp_path / "tiny"
    rc = cli_main(["make-tiny-checkpoint", str(out), "--layers", "4", "--kv-heads", "2", "--heads", "4",
                   "--hidden", "256", "--intermediate", "512", "--vit-depth", "4", "--seed", "7"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out.resolve())
    files = resolve_checkpoint(out)
    report = check_checkpoint(files)
    assert report.ok and report.model.matched == 4 * 28 + 13 and report.vit.matched == 4 * 12 + 6
    cfg = load_lance_config(files)
    assert (cfg.llm.num_hidden_layers, cfg.llm.num_attention_heads, cfg.llm.num_key_value_heads) == (4, 4, 2)
    assert cfg.llm.head_dim == 64 and cfg.llm.mrope_section == (8, 12, 12)
    with SafetensorsFile(files.llm_weights_path) as f:
        assert f.shape("language_model.model.layers.3.self_attn.k_proj_moe_gen.weight") == (128, 256)
        norm = f.get("language_model.model.layers.3.input_layernorm_moe_gen.weight")
        assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.05  # 1 + 0.1 N(0,1), not exactly 1
    vit = json.loads(files.vit_config_path.read_text())
    assert vit["out_hidden_size"] == 256 and vit["fullatt_block_indexes"] == [1, 3]
    assert len(load_tokenizer(files)) == 998


@pytest.mark.slow
def test_make_tiny_video_variant_has_vit_copy_and_3d_table(tmp_path):
    spec = TinyCheckpointSpec(hidden=64, heads=1, kv_heads=1, layers=1, variants=("Lance_3B", "Lance_3B_Video"))
    make_tiny_checkpoint(tmp_path, spec)
    image, video = (resolve_checkpoint(tmp_path, v) for v in ("Lance_3B", "Lance_3B_Video"))
    report = check_checkpoint(video)
    assert report.ok and report.model.allowed_missing == ()
    vit_names = set(expected_vit_tensor_shapes(json.loads(video.vit_config_path.read_text())))
    with SafetensorsFile(video.llm_weights_path) as v, SafetensorsFile(image.llm_weights_path) as i:
        assert {n[len("vit_model."):] for n in v if n.startswith("vit_model.")} == vit_names
        table = v.get("latent_pos_embed.pos_embed")
        assert table.shape == (31 * 64 * 64, 64)
        assert torch.equal(table[:4096], i.get("latent_pos_embed.pos_embed"))  # t=0 rows: the image table
        name = "language_model.model.layers.0.self_attn.q_norm_moe_gen.weight"
        assert not torch.equal(v.get(name), i.get(name))  # separate fine-tunes


@pytest.mark.slow
def test_make_tiny_is_deterministic_per_seed(tmp_path):
    spec = TinyCheckpointSpec(layers=1, vit_depth=1)
    a = make_tiny_checkpoint(tmp_path / "a", spec)
    b = make_tiny_checkpoint(tmp_path / "b", spec)
    c = make_tiny_checkpoint(tmp_path / "c", TinyCheckpointSpec(layers=1, vit_depth=1, seed=1))
    for rel in ("Lance_3B/model.safetensors", "Qwen2.5-VL-ViT/vit.safetensors", "Wan2.2_VAE.pth"):
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
        assert (a.root / rel).read_bytes() != (c.root / rel).read_bytes(), rel


@pytest.mark.parametrize("args,message", [
    (["--hidden", "96", "--heads", "2"], "head_dim = hidden/heads = 48"),
    (["--hidden", "256", "--heads", "4", "--kv-heads", "3"], "not a multiple of kv-heads"),
    (["--vocab-size", "500"], "vocab-size 500 < the tokenizer's 998"),
])
def test_make_tiny_rejects_bad_geometry_with_a_message(tmp_path, capsys, args, message):
    assert cli_main(["make-tiny-checkpoint", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_lists_every_command_and_refuses_unknown_ones(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    listed = capsys.readouterr().out
    assert {"make-tiny-checkpoint", "check-checkpoint", "k8s"} <= {c.name for c in COMMANDS}
    assert all(c.name in listed for c in COMMANDS)
    with pytest.raises(SystemExit):
        cli_main(["no-such-command"])
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
