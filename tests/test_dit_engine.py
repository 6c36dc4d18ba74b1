"""DiT denoising engine (stages/dit): golden contexts in, upstream's final latents out; batching exact.

fp32 on CPU. The goldens' recorded context K/V and target positions are fed as the thinker's hand-off;
the engine's final latent must match upstream's within compare.py's default tolerance, through the
model core's forward (reference) and the packed fast forward alike.
"""
from __future__ import annotations

import pytest
import torch

from helpers import golden_handoff, grid_positions, synthetic_handoff
from stages.dit.engine import DenoiseEngine, DiTRequestError
from stages.dit.forward import BranchContext, FastForward, ReferenceForward, Row
from stages.dit.model import load_dit_model, memory_report
from stages.lance.checkpoint import resolve_checkpoint
from stages.lance.requests import DenoiseParams
from stages.lance.tiny import TinyCheckpointSpec, make_tiny_checkpoint
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def dit_model(tiny_ckpt_dir):
    model, _ = load_dit_model(resolve_checkpoint(tiny_ckpt_dir, need_vit=False, need_vae=False))
    return model


def job_for(engine, handoff):
    return engine.prepare(handoff, handoff.cond.kv, handoff.uncond.kv if handoff.uncond else None)


def run_alone(model, handoff, forward="fast"):
    engine = DenoiseEngine(model, forward)
    return engine.run([job_for(engine, handoff)])[0]


def assert_same(actual, expected, what, rel=1e-5):
    err = (actual - expected).abs().max().item()
    assert err <= 1e-6 + rel * expected.abs().max().item(), f"{what}: max|diff| {err:.3g}"


# --- loading -------------------------------------------------------------------------------------

def test_dit_model_holds_two_marker_rows_and_no_lm_head(dit_model, tiny_ckpt_dir):
    lm = dit_model.language_model
    assert lm.lm_head is None
    stored = load_file(str(tiny_ckpt_dir / "Lance_3B" / "model.safetensors"))
    emb = stored["language_model.model.embed_tokens.weight"]
    assert torch.equal(lm.embed_tokens.weight, emb[[985, 986]])  # vision_start, vision_end of llm_config.json
    full = sum(t.numel() for n, t in stored.items() if not n.startswith("latent_pos_embed"))
    dropped = emb.numel() - 2 * emb.shape[1] + stored["language_model.lm_head.weight"].numel()
    assert memory_report(dit_model).parameters == full - dropped


# --- goldens -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("forward", ["reference", "fast"])
@pytest.mark.parametrize("case", ["t2i", "image_edit"])
def test_golden_context_gives_upstream_final_latent(dit_model, golden, assert_golden, case, forward):
    g = golden(case)
    engine = DenoiseEngine(dit_model, forward)
    job = job_for(engine, golden_handoff(g, case))
    assert_golden(job.x, g["initial_noise_target"], "initial_noise_target")  # upstream's seeded draw
    seen = []
    job.on_step = lambda done, total: seen.append((done, total, job.x.clone()))
    engine.run([job])
    assert [s[:2] for s in seen] == [(i + 1, 30) for i in range(30)]
    for i in (0, 12, 25, 26, 29):  # across the CFG interval boundary (CFG on steps 0..25)
        assert_golden(seen[i][2], g["x_steps"][i + 1], f"x_steps[{i + 1}]")
    assert_golden(job.x.view(g["final_latent"].shape), g["final_latent"], "final_latent")
    assert engine.forwards_run == 30  # cond and uncond of a step in one forward


# --- batching --------------------------------------------------------------------------------------

def four_requests(golden):
    t2i, edit = golden("t2i"), golden("image_edit")
    return [
        golden_handoff(t2i, "t2i", request_id="a"),
        golden_handoff(edit, "image_edit", DenoiseParams(num_inference_steps=20, cfg_text_scale=2.5,
                                                         cfg_interval=(0.0, 0.7), cfg_renorm_type="channel", seed=7),
                       request_id="b"),
        synthetic_handoff(t2i, "c", (1, 6, 10), DenoiseParams(num_inference_steps=12, timestep_shift=2.0,
                                                              cfg_text_scale=1.0, seed=3), cond_len=30, uncond_len=None),
        golden_handoff(t2i, "t2i", DenoiseParams(num_inference_steps=18, cfg_text_scale=3.0, cfg_interval=(0.2, 0.9),
                                                 cfg_renorm_type="none", seed=123), request_id="d"),
    ]


@pytest.mark.slow
def test_batch_of_four_different_requests_equals_each_alone(dit_model, golden):
    handoffs = four_requests(golden)
    alone = [run_alone(dit_model, h) for h in handoffs]
    engine = DenoiseEngine(dit_model, "fast")
    jobs = [job_for(engine, h) for h in handoffs]
    engine.submit(jobs[0])
    engine.submit(jobs[1])
    for step in range(8):           # c joins after 3 steps, d after 7; b and c leave early
        if step == 3:
            engine.submit(jobs[2])
        if step == 7:
            engine.submit(jobs[3])
        engine.step()
    while engine.has_work:
        engine.step()
    for job, expected in zip(jobs, alone):
        assert job.step == job.total_steps
        assert_same(job.x, expected, f"request {job.request_id}")
    assert max(max(j.forward_calls) for j in jobs) >= 5    # rows of several requests in one forward
    assert engine.forwards_run == 30                         # one forward per step: a's 30 steps


@pytest.mark.slow
def test_batched_engine_equals_reference_engine(dit_model, golden):
    handoffs = four_requests(golden)
    fast = DenoiseEngine(dit_model, "fast")
    ref = DenoiseEngine(dit_model, "reference")
    got = fast.run([job_for(fast, h) for h in handoffs])
    want = ref.run([job_for(ref, h) for h in handoffs])
    for i, (a, b) in enumerate(zip(got, want)):
        assert_same(a, b, f"request {i}")


@pytest.mark.slow
def test_token_budget_splits_forwards_but_not_results(dit_model, golden):
    handoffs = four_requests(golden)
    alone = [run_alone(dit_model, h) for h in handoffs]
    engine = DenoiseEngine(dit_model, "fast", max_tokens_per_forward=300, max_batch_size=3)
    jobs = [job_for(engine, h) for h in handoffs]
    engine.run(jobs)
    for job, expected in zip(jobs, alone):
        assert_same(job.x, expected, job.request_id)
        assert max(job.forward_calls) <= 4  # the edit request (2 x 268 tokens) never shares a forward
    assert len(jobs[1].forward_calls) == 20 and max(jobs[1].forward_calls) <= 2


@pytest.mark.slow
def test_fast_forward_matches_reference_on_another_geometry(tmp_path):
    spec = TinyCheckpointSpec(layers=3, hidden=256, heads=4, kv_heads=2, intermediate=320)
    files = make_tiny_checkpoint(tmp_path / "wide", spec)
    model, cfg = load_dit_model(files)
    llm = cfg.llm
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, grid in [(17, (1, 3, 5)), (40, (1, 4, 4)), (17, (1, 3, 5)), (0, (1, 2, 2))]:
        n = grid[1] * grid[2]
        kv = [torch.randn(llm.num_hidden_layers, length, llm.num_key_value_heads, llm.head_dim, generator=g)
              for _ in range(2)]
        branch = BranchContext(kv[0], kv[1], grid_positions(length + 3, grid), grid)
        rows.append(Row(branch, torch.randn(n, 48, generator=g), torch.rand((), generator=g), request=object()))
    fast, ref = FastForward(model)(rows), ReferenceForward(model)(rows)
    for i, (a, b) in enumerate(zip(fast, ref)):
        assert a.shape == b.shape
        assert_same(a, b, f"row {i}")


# --- FP8 weights (opt-in) ------------------------------------------------------------------------

def test_fp8_weights_halve_the_layers_and_stay_close_to_full_precision(tiny_ckpt_dir, dit_model, golden):
    from stages.dit.quantize import quantize_dit_model, quantize_weight, quantized_linears

    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 1, 64)[:, None]
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    assert ((q.float() * scale[:, None] - w).abs().amax(1) <= w.abs().amax(1) / 16 + 1e-12).all()  # < 1 step per row

    model, _ = load_dit_model(resolve_checkpoint(tiny_ckpt_dir, need_vit=False, need_vae=False))
    before = memory_report(model).parameter_bytes
    layer_bytes = sum(lin.weight.numel() * 4 for lin in quantized_linears(model))
    assert quantize_dit_model(model, "fp8") == "fp8"
    assert memory_report(model).parameter_bytes == before - layer_bytes * 3 // 4   # fp32 -> 1 byte a weight
    with pytest.raises(ValueError, match="unquantized"):
        ReferenceForward(model)
    h = golden_handoff(golden("t2i"), "t2i")
    x8, x32 = run_alone(model, h), run_alone(dit_model, h, "reference")
    rel = ((x8 - x32).norm() / x32.norm()).item()
    assert 1e-4 < rel < 0.1, rel    # quantized (not a silent full-precision run), and close
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_dit_model(model, "int4")


def test_runner_loads_fp8_weights_and_decodes(tiny_ckpt_dir, golden):
    from stages.dit.runner import DiTRunner

    runner = DiTRunner(str(tiny_ckpt_dir), dtype="float32", device="cpu", compile=False, quantization="fp8")
    assert runner.quantization == "fp8"
    mem = runner.memory()
    assert mem["dit_parameter_bytes"] < 0.5 * 4 * mem["dit_parameters"]   # most weights 1 byte, not 4
    h = golden_handoff(golden("t2i"), "t2i", DenoiseParams(num_inference_steps=3, seed=1))
    runner.submit(runner.prepare(h, h.cond.kv, h.uncond.kv))
    done = []
    while runner.has_work:
        done += runner.step()
    (job, image), = done
    assert image.pixels.dtype == torch.uint8 and (image.height, image.width) == (128, 128)
    assert image.latents is None and image.encode().startswith(b"\x89PNG")


# --- bad hand-offs -------------------------------------------------------------------------------

def test_bad_handoffs_are_request_errors(dit_model, golden):
    g = golden("t2i")
    engine = DenoiseEngine(dit_model, "fast")
    good = golden_handoff(g, "t2i")

    def fails(param, **changes):
        h = golden_handoff(g, "t2i")
        for k, v in changes.items():
            setattr(h, k, v)
        with pytest.raises(DiTRequestError) as e:
            job_for(engine, h)
        assert e.value.http_status == 400 and e.value.param == param, str(e.value)

    fails("latent_grid", latent_grid=(1, 8, 80))
    fails("cond.query_positions", latent_grid=(1, 8, 7))
    fails("num_inference_steps", params=DenoiseParams(num_inference_steps=0))
    fails("num_inference_steps", params=DenoiseParams(num_inference_steps=201))   # the API's limit, not another
    fails("timestep_shift", params=DenoiseParams(timestep_shift=101.0))
    fails("cfg_interval", params=DenoiseParams(cfg_interval=(0.8, 0.2)))
    fails("cfg_renorm_type", params=DenoiseParams(cfg_renorm_type="bogus"))
    fails("uncond", uncond=None)
    fails("initial_noise", initial_noise=torch.zeros(3, 48))
    with pytest.raises(DiTRequestError, match=r"cond K has shape"):
        engine.prepare(good, (good.cond.kv[0][:1], good.cond.kv[1]), good.uncond.kv)
