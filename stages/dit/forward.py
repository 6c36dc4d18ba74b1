"""Velocity forwards of the DiT: rows (one CFG branch of one request at one step) in, velocities out.

Two implementations of one function, checked against each other:

* `ReferenceForward` - the model core as it is (`stages.lance.denoise.predict_velocity`): one forward
  per request with its cond and uncond rows padded into a batch with a mask, experts routed by index.
* `FastForward` - every row of every request packed into one token stream. The gen expert runs on
  all tokens and the und expert re-runs only the two markers of each row, whose results are patched
  in (2 tokens per row of wasted gen work instead of a gather/scatter of every activation); residual
  adds ride in the GEMM epilogue (addmm); each row attends to its own [context; query] keys, which the
  qk-norm/RoPE kernel writes in place into one packed key/value buffer, without a mask: one
  variable-length FlashAttention-4 call for all rows, or one dense SDPA call (flash/cuDNN kernels) per
  group of rows with equal shapes. Token order inside a row is
  [latents, vision_start, vision_end]: the query block is non-causal and RoPE uses explicit positions,
  so the order does not change the result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from stages.lance.denoise import batch_caches, predict_velocity
from stages.lance.embeddings import embed_latent_tokens
from stages.lance.model import LanceModel
from stages.lance.transformer import KVCache, mrope_cos_sin

from .kernels import ElementwiseOps
from .model import MARKER_IDS
from .quantize import DenseLinears, Fp8Linears, is_quantized

_uids = itertools.count()
log = logging.getLogger(__name__)


@dataclass(eq=False)
class BranchContext:
    """One CFG branch of one request on the model's device: its context cache and target positions."""

    keys: torch.Tensor        # [num_layers, L, Hkv, d], after qk-norm and RoPE
    values: torch.Tensor      # [num_layers, L, Hkv, d]
    positions: torch.Tensor   # [3, n + 2] int64: vision_start, latents (t, h, w order), vision_end
    grid: tuple[int, int, int]
    clean_rows: int = 0       # i2v: leading latent rows that are clean conditioning (embedded at timestep 0)
    uid: int = field(default_factory=lambda: next(_uids))
    _cache: KVCache | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    @property
    def num_latents(self) -> int:
        return self.positions.shape[1] - 2

    def as_kv_cache(self) -> KVCache:
        """The model core's cache view ([1, L, Hkv, d] per layer, no copy)."""
        if self._cache is None:
            self._cache = KVCache.from_stacked(self.keys, self.values)
        return self._cache


@dataclass(eq=False)
class Row:
    """One forward row: a branch's target block at the current latents and sigma."""

    branch: BranchContext
    latents: torch.Tensor     # [n, channels] in the model dtype
    sigma: torch.Tensor       # scalar
    request: object = None    # rows of one request share this key (the reference path batches them)


class VelocityForward(Protocol):
    def __call__(self, rows: list[Row]) -> list[torch.Tensor]:
        """Velocities [n, channels] (fp32) of the rows, in order."""


class ReferenceForward:
    """The model core's forward, one request at a time (its rows batched with a padding mask)."""

    def __init__(self, model: LanceModel):
        if is_quantized(model):
            raise ValueError("the reference forward runs the model core's unquantized weights; "
                             "a quantized model runs the fast forward")
        self.model = model
        self.markers = MARKER_IDS.to(model.vae2llm.weight.device)
        self._batched: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()

    @torch.no_grad()
    def __call__(self, rows: list[Row]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(rows)
        by_request: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            by_request.setdefault(id(row.request) if row.request is not None else -i - 1, []).append(i)
        for idx in by_request.values():
            group = [rows[i] for i in idx]
            x = torch.stack([r.latents for r in group])
            sigma = torch.stack([r.sigma.reshape(()) for r in group]).to(x)
            positions = torch.stack([r.branch.positions for r in group])
            v = predict_velocity(self.model, x, sigma, group[0].branch.grid, self.markers, positions,
                                 self._cache([r.branch for r in group]), group[0].branch.clean_rows)
            for j, i in enumerate(idx):
                out[i] = v[j].float()
        return out

    def _cache(self, branches: list[BranchContext]) -> KVCache:
        if len(branches) == 1:
            return branches[0].as_kv_cache()
        key = tuple(b.uid for b in branches)
        if key not in self._batched:
            self._batched[key] = batch_caches([b.as_kv_cache() for b in branches])
            while len(self._batched) > 16:
                self._batched.popitem(last=False)
        self._batched.move_to_end(key)
        return self._batched[key]


@dataclass
class _Group:
    """Rows with equal (context length, query length), contiguous in the packed token stream and in the
    packed key/value rows (each row's [context; query] keys one after the other)."""

    token_start: int
    token_end: int
    rows: int
    query_len: int
    keys: torch.Tensor    # [num_layers, rows, L, Hkv, d]
    values: torch.Tensor
    kv_start: int = 0
    kv_end: int = 0

    @property
    def context_len(self) -> int:
        return self.keys.shape[2]


@dataclass
class _Plan:
    """Everything about one batch composition that does not change from step to step."""

    order: list[int]              # packed row -> index into the caller's rows
    latent_counts: list[int]      # per packed row
    latent_index: torch.Tensor    # [T_lat] positions of latent tokens in the packed stream
    latent_row: torch.Tensor      # [T_lat] packed row of each latent token
    marker_index: torch.Tensor    # [2R] positions of (vision_start, vision_end) of every row
    groups: list[_Group]
    cos: torch.Tensor             # [T, d] fp32
    sin: torch.Tensor
    pos_embed: torch.Tensor       # [T_lat, hidden] latent position embeddings
    tokens: int
    # the attention's packed key/value rows: row r holds [its context; its query block] at cu_seqlens_k[r]
    kv_rows: int = 0
    kv_index: torch.Tensor | None = None        # [T] key/value row of each packed token
    marker_kv_index: torch.Tensor | None = None  # [2R] key/value rows of the markers (= kv_index[marker_index])
    cu_seqlens_q: torch.Tensor | None = None    # [R + 1] int32, for a variable-length attention kernel
    cu_seqlens_k: torch.Tensor | None = None
    max_query_len: int = 0
    max_kv_len: int = 0
    clean_index: torch.Tensor | None = None  # [C] latent tokens embedded at timestep 0 (i2v's first frame)
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def signature(self) -> tuple:
        """What a captured CUDA graph depends on: the group shapes (not which requests fill them)."""
        return tuple((g.rows, g.query_len, g.keys.shape[2]) for g in self.groups)

    def static_copy(self) -> "_Plan":
        """A copy a captured graph owns: the per-request data cloned; the index tensors are fixed by the
        signature, so they are shared."""
        groups = [dataclasses.replace(g, keys=g.keys.clone(), values=g.values.clone()) for g in self.groups]
        return dataclasses.replace(self, latent_index=self.latent_index.clone(), marker_index=self.marker_index.clone(),
                                   groups=groups, cos=self.cos.clone(), sin=self.sin.clone(), uid=next(_uids))

    def load_into(self, static: "_Plan") -> None:
        """Copy this plan's per-request data into a captured graph's static plan of the same signature."""
        static.cos.copy_(self.cos)
        static.sin.copy_(self.sin)
        for dst, src in zip(static.groups, self.groups):
            dst.keys.copy_(src.keys)
            dst.values.copy_(src.values)


@dataclass
class _Graph:
    """One captured forward of the layers: replay after filling `x` (and the static plan)."""

    graph: object
    plan: _Plan
    x: torch.Tensor
    out: torch.Tensor
    loaded: int


class _StreamFork:
    """A second CUDA stream for the und chain of `FastForward.run_layers` (no-op without a device).

    `side()` runs its block on the side stream after everything queued so far on the main stream;
    `join_main()` makes the main stream wait for everything queued so far on the side stream. Tensors
    that cross between the streams are kept alive until the final join, so the caching allocator never
    hands their memory to one stream while the other may still read it (also inside graph capture).
    """

    def __init__(self, device: torch.device | None):
        self.main = self.stream = None
        if device is not None and device.type == "cuda":
            self.main = torch.cuda.current_stream(device)
            self.stream = _side_stream(device)
        self._kept: list[torch.Tensor] = []

    def side(self):
        if self.stream is None:
            return contextlib.nullcontext()
        self.stream.wait_stream(self.main)
        return torch.cuda.stream(self.stream)

    def join_main(self) -> None:
        if self.stream is not None:
            self.main.wait_stream(self.stream)

    def keep(self, *tensors) -> None:
        if self.stream is not None:
            self._kept.extend(tensors)

    def release(self) -> None:
        self._kept.clear()


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


def flash_attn_4_available(device: torch.device) -> bool:
    """Is FlashAttention-4 (the `flash-attn-4` package, CuTe DSL kernels) installed, for a Hopper or newer GPU?"""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    import importlib.util

    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ModuleNotFoundError:   # no flash_attn package at all
        return False


@functools.cache
def _flash_attn_varlen():
    """FlashAttention-4's variable-length forward, imported once (eager forwards call it every layer)."""
    from flash_attn.cute import flash_attn_varlen_func

    return flash_attn_varlen_func


class FastForward:
    """All rows in one packed forward (see the module docstring). Same function as ReferenceForward."""

    def __init__(self, model: LanceModel, kernels: str = "torch", attention_backends=None, cuda_graphs: bool = False,
                 max_plans: int = 8, max_graphs: int = 16, overlap_markers: bool = True,
                 max_graph_tokens: int = 40000, attention_kernel: str = "sdpa", gate_up_kernel: str = "cublas"):
        """`attention_kernel`: "sdpa" (torch's scaled_dot_product_attention, `attention_backends` pins its
        kernels) or "flash_attn_4" (FlashAttention-4's variable-length kernel, GPU only; where the package
        or the GPU does not take it, SDPA runs instead).
        `gate_up_kernel` (bf16/fp16 weights): "cublas" or "triton_swiglu" (the MLP's gate_up GEMM with SwiGLU
        in its epilogue; see quantize.DenseLinears).
        `overlap_markers` (GPU): the und expert's marker rows on a second stream (see run_layers).
        `max_graph_tokens`: larger forwards run eagerly, never captured (a 121-frame 480p video is 49,292
        tokens per CFG branch; 8 CFG requests at 768^2 are 36,896): such a forward takes seconds, so launch
        overhead is nothing next to it, and its graph would keep gigabytes of activations reserved."""
        self.model = model
        self.overlap_markers = overlap_markers
        self.cfg = model.config.llm
        self.ops = ElementwiseOps(kernels)
        self.device = model.vae2llm.weight.device
        self.dtype = model.vae2llm.weight.dtype
        # projections: weights in the model dtype, or FP8 with per-token activation scales (quantize.py)
        self.linears = (Fp8Linears(self.ops, self.device, self.dtype) if is_quantized(model)
                        else DenseLinears(self.ops, gate_up_kernel))
        if attention_kernel not in ("sdpa", "flash_attn_4"):
            raise ValueError(f"unknown attention kernel {attention_kernel!r} (sdpa | flash_attn_4)")
        if attention_kernel == "flash_attn_4" and not flash_attn_4_available(self.device):
            if self.device.type == "cuda":
                log.info("FlashAttention-4 is not installed for this GPU (the `gpu` extra); the DiT uses SDPA")
            attention_kernel = "sdpa"
        self.attention_kernel = attention_kernel
        self._attention_settled = attention_kernel == "sdpa"
        self.attention_backends = attention_backends   # e.g. [SDPBackend.CUDNN_ATTENTION]; None = SDPA's choice
        self.expand_kv: bool | None = None             # decided on first use: does the backend take GQA?
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self.max_plans = max_plans
        # CUDA graphs, one per plan signature, captured the second time a signature is seen (the
        # first eager run compiles kernels and settles the attention backend); all share one pool.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.max_graphs = max_graphs
        self.max_graph_tokens = max_graph_tokens
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: dict[tuple, int] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    # --- per batch composition --------------------------------------------------------------------

    def plan(self, rows: list[Row]) -> _Plan:
        key = tuple(r.branch.uid for r in rows)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._build_plan(rows)
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return plan

    def _build_plan(self, rows: list[Row]) -> _Plan:
        shape_of = [(r.branch.length, r.branch.num_latents) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: shape_of[i])   # stable: equal shapes stay in order
        lat_index, mk_index, cos, sin, pos, groups, clean = [], [], [], [], [], [], []
        kv_index, cu_q, cu_k = [], [0], [0]
        at = lat_at = kv_at = 0
        for shape, members in itertools.groupby(order, key=lambda i: shape_of[i]):
            members = list(members)
            length, n = shape
            start, kv_start = at, kv_at
            for i in members:
                b = rows[i].branch
                lat_index.append(torch.arange(at, at + n))
                mk_index.append(torch.tensor([at + n, at + n + 1]))
                kv_index.append(torch.arange(kv_at + length, kv_at + length + n + 2))
                kv_at += length + n + 2
                cu_q.append(at + n + 2)
                cu_k.append(kv_at)
                # [vs, latents, ve] -> [latents, vs, ve]
                perm = torch.cat([torch.arange(1, n + 1), torch.tensor([0, n + 1])]).to(b.positions.device)
                c, s = mrope_cos_sin(b.positions[:, perm][None].to(self.device), self.cfg, torch.float32)
                cos.append(c[0])
                sin.append(s[0])
                pos.append(self.model.latent_positions(b.grid))
                if b.clean_rows:
                    clean.append(torch.arange(lat_at, lat_at + b.clean_rows))
                at += n + 2
                lat_at += n
            keys = torch.stack([rows[i].branch.keys for i in members], dim=1)
            values = torch.stack([rows[i].branch.values for i in members], dim=1)
            groups.append(_Group(start, at, len(members), n + 2, keys, values, kv_start, kv_at))
        counts = [shape_of[i][1] for i in order]
        marker_index = torch.cat(mk_index)
        kv_index = torch.cat(kv_index)
        return _Plan(order=order, latent_counts=counts, latent_index=torch.cat(lat_index).to(self.device),
                     latent_row=torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(self.device),
                     marker_index=marker_index.to(self.device),
                     groups=groups, cos=torch.cat(cos).contiguous(), sin=torch.cat(sin).contiguous(),
                     pos_embed=torch.cat(pos), tokens=at, kv_rows=kv_at, kv_index=kv_index.to(self.device),
                     marker_kv_index=kv_index[marker_index].to(self.device),
                     cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=self.device),
                     cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=self.device),
                     max_query_len=max(b - a for a, b in zip(cu_q, cu_q[1:])),
                     max_kv_len=max(b - a for a, b in zip(cu_k, cu_k[1:])),
                     clean_index=torch.cat(clean).to(self.device) if clean else None)

    # --- the forward --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, rows: list[Row]) -> list[torch.Tensor]:
        plan = self.plan(rows)
        x = self.embed(plan, rows)
        graphed = self.cuda_graphs and plan.tokens <= self.max_graph_tokens
        v = self._graphed_layers(plan, x) if graphed else self.run_layers(plan, x)
        out: list[torch.Tensor | None] = [None] * len(rows)
        for i, part in zip(plan.order, v.split(plan.latent_counts)):
            out[i] = part.to(torch.float32, copy=True)   # a graph's output buffer is reused
        return out

    def _graphed_layers(self, plan: _Plan, x: torch.Tensor) -> torch.Tensor:
        sig = plan.signature
        graph = self._graphs.get(sig)
        if graph is None:
            self._seen[sig] = self._seen.get(sig, 0) + 1
            if self._seen[sig] < 2:
                return self.run_layers(plan, x)
            graph = self._graphs[sig] = self._capture(plan, x)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(sig)
        if graph.loaded != plan.uid:
            plan.load_into(graph.plan)
            graph.loaded = plan.uid
        graph.x.copy_(x)
        graph.graph.replay()
        return graph.out

    def _capture(self, plan: _Plan, x: torch.Tensor) -> _Graph:
        static, static_x = plan.static_copy(), x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):      # warm-up on a side stream, as capture requires
            self.run_layers(static, static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the encoder pool waiting on finished images' copies) may keep making
        # CUDA calls while this thread captures; "global" would make those calls fail the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.run_layers(static, static_x)
        return _Graph(graph, static, static_x, out, plan.uid)

    def embed(self, plan: _Plan, rows: list[Row]) -> torch.Tensor:
        """Packed input embeddings [T, hidden]."""
        m = self.model
        ordered = [rows[i] for i in plan.order]
        latents = torch.cat([r.latents for r in ordered]).to(self.dtype)
        sigmas = torch.stack([r.sigma.reshape(()) for r in ordered]).to(self.device, self.dtype)  # as the core does
        temb = m.time_embedder(sigmas).to(self.dtype)
        temb = temb.index_select(0, plan.latent_row)   # no host sync: the step before may still be running
        if plan.clean_index is not None:                 # i2v's clean first frame: timestep 0 at every step
            zero = m.time_embedder(sigmas.new_zeros(1)).to(self.dtype)
            temb = temb.index_copy(0, plan.clean_index, zero.expand(len(plan.clean_index), -1))
        lat = embed_latent_tokens(m.vae2llm, latents, temb, plan.pos_embed)
        x = lat.new_empty(plan.tokens, lat.shape[1])
        x.index_copy_(0, plan.latent_index, lat)
        x.index_copy_(0, plan.marker_index, m.language_model.embed_tokens.weight.repeat(len(ordered), 1))
        return x

    def run_layers(self, plan: _Plan, x: torch.Tensor) -> torch.Tensor:
        """Packed embeddings [T, hidden] -> velocities of the latent tokens [T_lat, channels].

        Two chains: the gen expert on every token (marker rows included, as wasted work), and the und
        expert on the markers' own residual stream `x_u` (2 rows per packed row). They meet once per
        layer: the markers' q (and k/v rows) are patched into the attention input, and the und chain takes the
        markers' attention output. The gen chain's marker rows are never read by anything that matters
        (per-token ops only; the final norm reads latent rows), so they are never patched back. On a
        GPU the und chain runs on a second stream (a parallel branch of the CUDA graph), free to use the
        gaps between the gen chain's kernels for its ~5.5 GB of weight reads on a handful of tokens
        (cuBLAS's persistent GEMMs hold every SM, so the overlap is partial: benchmarks/dit_notes.md).
        """
        lm = self.model.language_model
        layers, mk = lm.layers, plan.marker_index
        fork = _StreamFork(self.device) if self.overlap_markers else _StreamFork(None)
        x_u = x.index_select(0, mk)
        cos_u, sin_u = plan.cos.index_select(0, mk), plan.sin.index_select(0, mk)
        # every row's [context; query] keys and values, one layer at a time: the gen chain's qk-norm/RoPE
        # kernel writes its rows in place, so no per-layer concatenation
        kv_shape = (plan.kv_rows, self.cfg.num_key_value_heads, self.cfg.head_dim)
        k_rows, v_rows = x.new_empty(kv_shape), x.new_empty(kv_shape)
        with fork.side():
            qkv_u = self._qkv(layers[0].und, x_u, cos_u, sin_u)
            fork.keep(x_u, cos_u, sin_u, *qkv_u)
        for i, layer in enumerate(layers):
            gen, und = layer.gen, layer.und
            q = self._q_writing_kv(gen, x, plan, k_rows, v_rows)
            self._load_context(plan, k_rows, v_rows, i)
            fork.join_main()                 # the markers' q/k/v of this layer are ready
            q.index_copy_(0, mk, qkv_u[0])
            k_rows.index_copy_(0, plan.marker_kv_index, qkv_u[1])
            v_rows.index_copy_(0, plan.marker_kv_index, qkv_u[2])
            o = self.attention(q, k_rows, v_rows, plan)
            o_u = o.index_select(0, mk)
            fork.keep(o_u)
            with fork.side():                # waits for o_u
                x_u = self.linears.linear_add_(x_u, o_u, und.attn.o_proj)
                x_u = self._mlp(und, x_u)
                if i + 1 < len(layers):
                    qkv_u = self._qkv(layers[i + 1].und, x_u, cos_u, sin_u)
                    fork.keep(*qkv_u)
            x = self.linears.linear_add_(x, o, gen.attn.o_proj)   # in place
            x = self._mlp(gen, x)
        fork.join_main()
        fork.release()
        h = self.ops.rms_norm(x.index_select(0, plan.latent_index), lm.norm_gen.weight, lm.norm_gen.eps)
        return self.model.llm2vae(h)

    def _qkv(self, expert, x, cos, sin):
        attn = expert.attn
        qkv = self.linears.norm_linear(x, expert.input_layernorm, attn.qkv_proj)
        return self.ops.qk_norm_rope(qkv, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps, cos, sin,
                                     self.cfg.num_attention_heads, self.cfg.num_key_value_heads)

    def _q_writing_kv(self, expert, x, plan: _Plan, k_rows, v_rows):
        """q of the packed tokens; their k and v go straight into their rows of k_rows / v_rows."""
        attn = expert.attn
        qkv = self.linears.norm_linear(x, expert.input_layernorm, attn.qkv_proj)
        return self.ops.qk_norm_rope_into(qkv, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps,
                                          plan.cos, plan.sin, self.cfg.num_attention_heads,
                                          self.cfg.num_key_value_heads, k_rows, v_rows, plan.kv_index)

    def _mlp(self, expert, x):
        """x + mlp(post_attention_layernorm(x)), accumulated into x."""
        mlp = expert.mlp
        return self.linears.mlp_add_(x, expert.post_attention_layernorm, mlp.gate_up_proj, mlp.down_proj)

    @staticmethod
    def _load_context(plan: _Plan, k_rows: torch.Tensor, v_rows: torch.Tensor, layer: int) -> None:
        """Layer `layer`'s context keys/values into the head of every row's key/value block."""
        for g in plan.groups:
            if g.context_len:
                shape = (g.rows, g.context_len + g.query_len, *k_rows.shape[1:])
                k_rows[g.kv_start:g.kv_end].view(shape)[:, :g.context_len].copy_(g.keys[layer])
                v_rows[g.kv_start:g.kv_end].view(shape)[:, :g.context_len].copy_(g.values[layer])

    def attention(self, q, k_rows, v_rows, plan: _Plan) -> torch.Tensor:
        """Every row's queries against its [context; query] keys, no mask -> [T, Hq*d].

        With FlashAttention-4 one variable-length call covers all rows (CFG's cond and uncond rows have
        contexts of different lengths); with SDPA, one dense call per group of equal-shape rows."""
        if self.attention_kernel == "flash_attn_4":
            if self._attention_settled:
                return self._flash_attn_4(q, k_rows, v_rows, plan)
            try:   # first call (eager, before any capture): compiles the kernel, or finds it does not run here
                out = self._flash_attn_4(q, k_rows, v_rows, plan)
                self._attention_settled = True
                return out
            except Exception as exc:  # noqa: BLE001 - any failure of the optional kernel means: use SDPA
                log.warning("FlashAttention-4 does not run here (%s: %s); the DiT uses SDPA", type(exc).__name__, exc)
                self.attention_kernel, self._attention_settled = "sdpa", True
        outs = []
        for g in plan.groups:
            rows, n = g.rows, g.query_len
            qg = q[g.token_start:g.token_end].view(rows, n, *q.shape[1:]).transpose(1, 2)
            kv_shape = (rows, g.context_len + n, *k_rows.shape[1:])
            kg = k_rows[g.kv_start:g.kv_end].view(kv_shape).transpose(1, 2)
            vg = v_rows[g.kv_start:g.kv_end].view(kv_shape).transpose(1, 2)
            og = self._sdpa(qg, kg, vg)
            outs.append(og.transpose(1, 2).reshape(rows * n, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def _flash_attn_4(q, k_rows, v_rows, plan: _Plan) -> torch.Tensor:
        out = _flash_attn_varlen()(q, k_rows, v_rows, cu_seqlens_q=plan.cu_seqlens_q,
                                   cu_seqlens_k=plan.cu_seqlens_k, max_seqlen_q=plan.max_query_len,
                                   max_seqlen_k=plan.max_kv_len)
        return (out[0] if isinstance(out, tuple) else out).reshape(q.shape[0], -1)

    def _sdpa(self, q, k, v):
        if self.expand_kv is None:
            self._settle_attention(q, k, v)
        return self._sdpa_call(q, k, v, expand=self.expand_kv)

    def _settle_attention(self, q, k, v) -> None:
        """First call (eager, before any graph capture): does the chosen backend take this input, with
        GQA as is or with K/V heads expanded? If it takes neither, use SDPA's own choice."""
        for backends, expand in ((self.attention_backends, False), (self.attention_backends, True), (None, False)):
            self.attention_backends = backends
            try:
                self._sdpa_call(q, k, v, expand=expand)
            except RuntimeError:
                continue
            self.expand_kv = expand
            return
        raise RuntimeError("no scaled_dot_product_attention backend takes the DiT's attention inputs")

    def _sdpa_call(self, q, k, v, expand: bool):
        gqa = q.shape[1] != k.shape[1]
        if expand and gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            gqa = False
        if self.attention_backends is None:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.attention_backends):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
