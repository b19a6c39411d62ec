"""Mask-free window attention with the shipped architecture (RoPE, GQA, RMSNorm, SwiGLU, untied):
equal to the masked plain-PyTorch reference in loss and every gradient, no ``[queries, keys]``
tensor kept for backward, the single-call (CUDA / dropout) path equal to the merged-block path
and passing SDPA only calls the flash kernel takes, bf16 within its stated tolerance of fp32, and
activation recomputation (selective, full) giving the gradients of the run without it. On a GPU
(skipped elsewhere): the window call under the flash kernel alone, the GPU's numbers against the
fp32 reference with and without recomputation, TransformerEngine's path against it."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.configs import preset_model
from helpers.reference_gpt import reference_hidden, reference_logits

from localopt_plugin.data.layout import SampleLayout
from localopt_plugin.model import KVMemory, SDPAttention, build_gpt_model, layer_spec
from localopt_plugin.model import attention as attention_module
from localopt_plugin.objectives import LocalOptimization
from localopt_plugin.regularizers import ReCo, ReCoConfig
from localopt_plugin.training.steps import TrainingStep

LAYOUT = SampleLayout(video_start=3, num_frames=5, frame_tokens=16)
VOCAB = 100
WINDOW = 2
STARTS = (0, 1, 3)  # the first, a middle and the last window start of 5 frames


def fixed_window(first: int, frames: int = WINDOW):
    return SimpleNamespace(window_frames=frames, draw=lambda iteration, micro_batch: first)


def make(config=None, seed=0):
    torch.manual_seed(seed)
    model = build_gpt_model(config or preset_model("test"), VOCAB)
    tokens = torch.randint(0, VOCAB, (2, LAYOUT.seq_length))
    return model, tokens


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want, rtol=1e-5, atol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def test_model_has_the_shipped_architecture(dist_world_of_one):
    model, _ = make()
    config = model.config
    assert model.position_embedding_type == "rope" and config.normalization == "RMSNorm"
    assert config.gated_linear_unit and not config.add_bias_linear
    assert config.num_query_groups < config.num_attention_heads
    assert not model.share_embeddings_and_output_weights


def _masked_reference_loss(model, tokens: torch.Tensor, first: int,
                           perturb: str | None = None) -> torch.Tensor:
    """The window's loss by the plain-PyTorch masked reference (the context's keys/values
    detached); ``perturb`` breaks it the way a bug would break the window attention."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    start, end = LAYOUT.label_span(first, WINDOW)
    positions = torch.arange(inputs.shape[1], device=tokens.device)
    context = (positions >= LAYOUT.prefix_length) & (positions < start)
    if perturb == "dropped context":  # the window would not see the frames before it
        inputs = torch.where(context, torch.zeros_like(inputs), inputs)
    if perturb == "gradient through context":  # the context's keys/values not detached
        context = torch.zeros_like(context)
    logits = reference_logits(model, reference_hidden(model, inputs, detach_kv=context))
    return F.cross_entropy(logits[:, start:end].reshape(-1, logits.shape[-1]).float(),
                           labels[:, start:end].reshape(-1))


def _window_against_masked_reference(first: int, perturb: str | None = None) -> None:
    """Local Opt.'s loss and gradients against the plain-PyTorch masked reference."""
    model, tokens = make()
    local = LocalOptimization(LAYOUT, fixed_window(first))(model, tokens)
    local_grads = grads_of(model, local.loss)
    reference = _masked_reference_loss(model, tokens, first, perturb)
    torch.testing.assert_close(local.loss, reference, rtol=1e-5, atol=1e-5)
    assert_same_grads(local_grads, grads_of(model, reference), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("first", STARTS)
def test_window_equals_masked_reference(dist_world_of_one, first):
    _window_against_masked_reference(first)


@pytest.mark.parametrize("perturb", ["dropped context", "gradient through context"])
def test_the_masked_reference_tells_a_broken_window(dist_world_of_one, perturb):
    """Negative controls: a window that saw no context, or whose context kept its gradient,
    fails the comparison."""
    with pytest.raises(AssertionError):
        _window_against_masked_reference(3, perturb)


@pytest.mark.parametrize("first", STARTS[1:])
def test_no_query_by_key_tensor_is_kept_for_backward(dist_world_of_one, first):
    model, tokens = make()
    start, end = LAYOUT.label_span(first, WINDOW)
    queries = end - start  # the window's
    keys = end  # prefix, kept context and window
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LocalOptimization(LAYOUT, fixed_window(first))(model, tokens)
    assert shapes, "nothing was saved: the window pass did not run under autograd"
    forbidden = {(queries, keys), (keys, queries), (queries + LAYOUT.prefix_length, keys)}
    offending = [s for s in shapes if len(s) >= 2 and s[-2:] in forbidden]
    assert not offending, offending


def test_kept_context_is_read_without_copies():
    memory = KVMemory(2, 6)
    key, value = torch.randn(4, 1, 2, 8), torch.randn(4, 1, 2, 8)
    memory.store(1, key, value, position=2)
    keys, values = memory.read(1, 2, 6)
    buffers = memory.buffers(1)
    assert keys.data_ptr() == buffers[0].data_ptr() and values.data_ptr() == buffers[1].data_ptr()
    torch.testing.assert_close(keys, key)
    with pytest.raises(ValueError, match="in order"):
        memory.store(1, key[:1], value[:1], position=3)
    with pytest.raises(ValueError, match="holds positions"):
        memory.read(1, 1, 4)


def single_call_path(monkeypatch, model) -> list[SDPAttention]:
    """Make ``model`` take the path CUDA takes (every key in one buffer, one SDPA call per
    window) on this machine; returns its core attentions."""
    monkeypatch.setattr(attention_module, "cuda_available", lambda: True)
    cores = [m for m in model.modules() if isinstance(m, SDPAttention)]
    for core in cores:
        monkeypatch.setattr(core, "ordered_keys", True)
    return cores


def test_single_call_path_equals_merged_blocks(dist_world_of_one, monkeypatch):
    """The path CUDA and attention dropout take (every key in one buffer in position order,
    one SDPA call with a bottom-right causal bias) computes what the merged blocks compute."""
    model, tokens = make()
    merged = LocalOptimization(LAYOUT, fixed_window(3))(model, tokens)
    merged_grads = grads_of(model, merged.loss)
    cores = single_call_path(monkeypatch, model)
    calls = []
    real_ordered = attention_module.WindowKeys.ordered
    monkeypatch.setattr(attention_module.WindowKeys, "ordered",
                        lambda self: calls.append(1) or real_ordered(self))
    single = LocalOptimization(LAYOUT, fixed_window(3))(model, tokens)
    assert len(calls) == len(cores)
    torch.testing.assert_close(single.loss, merged.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads_of(model, single.loss), merged_grads)



FLASH_HEAD_SIZES = range(8, 257, 8)  # what the flash kernel takes (head size <= 256, by 8)


def _window_sdpa_calls(monkeypatch, materialise: bool = False) -> list[dict]:
    """The SDPA calls of the window pass on the single-call path (CUDA's), recorded."""
    from torch.nn.attention.bias import causal_lower_right

    model, tokens = make()
    single_call_path(monkeypatch, model)
    if materialise:  # negative control: the bias built into a [queries, keys] mask tensor
        monkeypatch.setattr(attention_module, "causal_lower_right",
                            lambda q, k: causal_lower_right(q, k)._materialize())
    in_window, calls = [False], []
    real_window, real_sdpa = SDPAttention._window, F.scaled_dot_product_attention

    def window(self, query, keys):
        in_window[0] = True
        try:
            return real_window(self, query, keys)
        finally:
            in_window[0] = False

    def sdpa(query, key, value, **kwargs):
        if in_window[0]:
            calls.append(dict(query=query, key=key, value=value, heads=model.config.
                              num_attention_heads, groups=model.config.num_query_groups,
                              **kwargs))
        return real_sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(SDPAttention, "_window", window)
    monkeypatch.setattr(attention_module, "F", SimpleNamespace(scaled_dot_product_attention=sdpa))
    LocalOptimization(LAYOUT, fixed_window(3))(model, tokens).loss.backward()
    assert len(calls) == model.config.num_layers
    return calls


def _assert_flash_takes(call: dict) -> None:
    from torch.nn.attention.bias import CausalBias, CausalVariant

    query, key, value, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
    queries, keys = query.shape[2], key.shape[2]
    if mask is None:
        assert call.get("is_causal") and queries == keys, "no mask: plain causal, square only"
    else:
        assert isinstance(mask, CausalBias), f"a {type(mask).__name__} mask rules flash out"
        assert mask.variant == CausalVariant.LOWER_RIGHT and not call.get("is_causal")
        assert (mask.seq_len_q, mask.seq_len_kv) == (queries, keys)
    assert query.shape[-1] in FLASH_HEAD_SIZES, query.shape
    # grouped keys by enable_gqa, not repeated to the query heads
    assert query.shape[1] == call["heads"] and key.shape[1] == value.shape[1] == call["groups"]
    assert call["groups"] < call["heads"] and call.get("enable_gqa")
    assert all(t.stride(-1) == 1 for t in (query, key, value)), "flash needs a dense last dim"


def test_window_calls_are_ones_the_flash_kernel_takes(dist_world_of_one, monkeypatch):
    """On the single-call path CUDA takes, each window call passes SDPA what flash accepts:
    no mask tensor (a ``causal_lower_right`` bias, which dispatches to flash as is), a head
    size flash supports, grouped keys through ``enable_gqa``. (The GPU test below runs it
    under the flash kernel alone; here no GPU is needed.)"""
    calls = _window_sdpa_calls(monkeypatch)
    assert all(c["query"].shape[2] < c["key"].shape[2] for c in calls)  # bottom-right case
    for call in calls:
        _assert_flash_takes(call)


def test_the_flash_check_tells_a_materialised_mask(dist_world_of_one, monkeypatch):
    """Negative control: the same calls with the bias built into a mask tensor fail."""
    calls = _window_sdpa_calls(monkeypatch, materialise=True)
    with pytest.raises(AssertionError, match="mask rules flash out"):
        _assert_flash_takes(calls[0])


# Local Opt. against the fp32 reference on the same weights: (loss, gradients) relative error;
# a gradient's error is its norm over the reference gradient's norm. bf16 is the stated
# tolerance of a bf16 run (weights, activations and attention in bf16) against fp32.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 5e-2)}


def _sharpened(model):
    """Query/key weights x4: attention far from uniform, so a misaligned mask shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "linear_qkv.weight" in name:
                param.mul_(4)
    return model


def _top_left_window(self, query, keys):
    """A wrongly aligned window (top-left causal: window queries cut off from the keys before
    them), for the negative controls (single-call path: every key in one buffer)."""
    from torch.nn.attention.bias import causal_upper_left

    k, v = keys.ordered()
    return self._sdpa(query, k, v, attn_mask=causal_upper_left(query.shape[0], k.shape[0]))


def against_fp32_reference(first: int, dtype: torch.dtype,
                           recompute: str | None = None) -> dict[str, float]:
    """Local Opt. in ``dtype`` (with ``recompute``), on the device models are built on, against
    the plain-PyTorch masked reference in fp32 on the same sharpened weights; returns the
    relative errors, AssertionError naming any outside :data:`TOLERANCES`."""
    reference_model, tokens = make()
    _sharpened(reference_model)
    config = preset_model("test", bf16=dtype is torch.bfloat16)
    if recompute:
        config = dataclasses.replace(config, **RECOMPUTE[recompute])
    model, _ = make(config)
    model.to(dtype)  # as DeepSpeed's bf16 engine and Megatron-LM's Float16Module cast it
    with torch.no_grad():
        for (name, param), (ref_name, ref) in zip(model.named_parameters(),
                                                  reference_model.named_parameters(),
                                                  strict=True):
            assert name == ref_name and param.dtype == dtype
            param.copy_(ref)
    model.train()
    tokens = tokens.to(next(model.parameters()).device)
    loss = LocalOptimization(LAYOUT, fixed_window(first))(model, tokens).loss
    grads = grads_of(model, loss)
    reference = _masked_reference_loss(reference_model, tokens, first)
    reference_grads = grads_of(reference_model, reference)
    assert grads.keys() == reference_grads.keys()
    errors = {"loss": abs(float(loss) - float(reference)) / abs(float(reference))}
    for name, want in reference_grads.items():
        errors[name] = float((grads[name].float() - want).norm() / want.norm())
    loss_tolerance, grad_tolerance = TOLERANCES[dtype]
    outside = {k: e for k, e in errors.items()
               if e > (loss_tolerance if k == "loss" else grad_tolerance) or e != e}
    assert not outside, f"outside the {dtype} tolerance: {outside}"
    return errors


def test_bf16_is_within_its_stated_tolerance_of_fp32(dist_world_of_one):
    """The bf16 tolerance the GPU tests use holds for a correct bf16 run (here on CPU)."""
    errors = against_fp32_reference(3, torch.bfloat16)
    assert 0 < errors["loss"]  # bf16 really ran: not the fp32 numbers


def test_the_bf16_tolerance_tells_a_top_left_window(dist_world_of_one, monkeypatch):
    """Negative control: a top-left aligned window lies outside the bf16 tolerance."""
    monkeypatch.setattr(attention_module, "cuda_available", lambda: True)  # single-call path
    monkeypatch.setattr(SDPAttention, "_window", _top_left_window)
    with pytest.raises(AssertionError, match="outside the torch.bfloat16 tolerance"):
        against_fp32_reference(3, torch.bfloat16)


RECOMPUTE = {
    "selective": dict(recompute_granularity="selective"),
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block",
                       recompute_num_layers=2),
}


@pytest.mark.parametrize("recompute", sorted(RECOMPUTE))
@pytest.mark.parametrize("first", [1, 3])
def test_recomputation_gives_the_same_gradients(dist_world_of_one, monkeypatch, recompute,
                                                first):
    _recomputation_against_plain(monkeypatch, recompute, first)


@pytest.mark.parametrize("recompute", ["selective", "full-uniform"])
def test_recomputation_comparison_tells_a_recompute_without_the_plan(dist_world_of_one,
                                                                     monkeypatch, recompute):
    """Negative control: a recomputed forward that lost the attention plan (the window
    attending without its context, as plain causal attention) fails the comparison."""
    from megatron.core.tensor_parallel.random import CheckpointFunction

    recomputing = [False]
    real_backward, real_forward = CheckpointFunction.backward, SDPAttention.forward

    def backward(ctx, *grads):
        recomputing[0] = True
        try:
            return real_backward(ctx, *grads)
        finally:
            recomputing[0] = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        plan = None if recomputing[0] else packed_seq_params
        return real_forward(self, query, key, value, attention_mask, attn_mask_type,
                            attention_bias, plan)

    monkeypatch.setattr(CheckpointFunction, "backward", staticmethod(backward))
    monkeypatch.setattr(SDPAttention, "forward", forward)
    with pytest.raises(AssertionError, match=r"^(decoder|embedding|output_layer)\."):
        _recomputation_against_plain(monkeypatch, recompute, 3)  # a parameter's gradient


def _recomputation_against_plain(monkeypatch, recompute: str, first: int) -> None:
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.attention import Attention

    plain_model, tokens = make()
    recomputing, _ = make(dataclasses.replace(preset_model("test"), **RECOMPUTE[recompute]))
    counted = []  # recomputed forwards of the window pass (the no-grad context pass enters
    # them too: not counted); full recomputation's entry is a TransformerBlock method up to
    # megatron-core 0.18, a function transformer_block imports from 0.19
    full = ((transformer_block.TransformerBlock, "_checkpointed_forward")
            if hasattr(transformer_block.TransformerBlock, "_checkpointed_forward")
            else (transformer_block, "checkpointed_forward"))
    for owner, name in ((Attention, "_checkpointed_attention_forward"), full):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, _name=name, **k: (
            torch.is_grad_enabled() and counted.append(_name), _real(*a, **k))[1])
    objective = LocalOptimization(LAYOUT, fixed_window(first))
    results, saved = [], []
    for model in (plain_model, recomputing):
        model.train()
        step = TrainingStep(model, objective, [ReCo(ReCoConfig(0.1, reduction="mean"))])
        stored = [0]

        def pack(t, stored=stored):
            stored[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, metrics, _ = step(tokens, 0, 0)
        saved.append(stored[0])
        results.append((total, metrics, grads_of(model, total)))
    assert counted, "the window pass did not recompute"
    assert saved[1] < saved[0], f"recomputation kept {saved[1]} bytes for backward, not fewer " \
        f"than {saved[0]}"
    (total, metrics, grads), (total_r, metrics_r, grads_r) = results
    torch.testing.assert_close(total_r, total, rtol=1e-5, atol=1e-6)
    assert float(metrics_r["reco raw"]) == pytest.approx(float(metrics["reco raw"]), rel=1e-5)
    assert_same_grads(grads_r, grads)


def test_transformer_engine_without_te_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("TransformerEngine is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="needs TransformerEngine.*--transformer-impl local"):
        layer_spec(preset_model("test", transformer_impl="transformer_engine"))


# -- on a GPU (skipped on CPU-only machines) ---------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



@pytest.mark.gpu
@gpu
def test_transformer_engine_path_equals_the_fp32_reference(dist_world_of_one, monkeypatch):
    """TransformerEngine's core attention (bf16, bottom-right causal) against the SDPA path in
    fp32, on weights whose attention is far from uniform; negative control: the same reference
    with a top-left aligned window lies outside the tolerance. Needs TransformerEngine, which
    cannot travel to the lent GPU machines (docs/benchmarks.md, "The GPU check")."""
    pytest.importorskip("transformer_engine", reason="TransformerEngine is not installed (it "
                        "cannot travel to the lent GPU machines: see docs/benchmarks.md)")
    config = preset_model("test")
    sdpa, tokens = make(config)
    te, _ = make(dataclasses.replace(config, bf16=True, transformer_impl="transformer_engine"))
    tokens = tokens.cuda()
    objective = LocalOptimization(LAYOUT, fixed_window(3))
    results = {}
    for name, model in (("reference", _sharpened(sdpa)), ("te", _sharpened(te))):
        loss = objective(model, tokens).loss
        results[name] = (loss.float(), grads_of(model, loss))
    monkeypatch.setattr(SDPAttention, "_window", _top_left_window)
    wrong = objective(sdpa, tokens).loss.float()
    reference, te_loss = results["reference"][0], results["te"][0]
    tolerance = 1e-2 * float(reference)
    assert abs(float(te_loss - reference)) < tolerance
    assert abs(float(wrong - reference)) > 3 * tolerance, "the control cannot tell the masks"
    assert abs(float(te_loss - wrong)) > tolerance
    shared = results["reference"][1].keys() & results["te"][1].keys()  # fused-norm names differ
    assert len(shared) > 10
    for name in shared:
        torch.testing.assert_close(results["te"][1][name].float(),
                                   results["reference"][1][name], rtol=5e-2, atol=2e-3, msg=name)


@pytest.mark.gpu
@gpu
def test_the_window_call_alone_runs_a_fused_kernel_on_gpu(dist_world_of_one, monkeypatch):
    """Each window call (SDPAttention._window: the window's queries against the kept context
    and themselves, bottom-right causal) runs under the flash kernel alone, so a call that
    needed another kernel (a materialised mask, the math kernel) raises; profiled alone it
    shows flash, no math kernel, and it keeps no [queries, keys] mask for backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, tokens = make(preset_model("test", bf16=True))
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine casts it (norm weights too)
    calls = []
    real = SDPAttention._window

    def window_alone(self, query, keys):
        shapes = []

        def pack(tensor):
            shapes.append(tuple(tensor.shape))
            return tensor

        flash_only = sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        with flash_only, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                out = real(self, query, keys)
                torch.cuda.synchronize()
        # (not keys.ordered() again: it writes into buffers the kernel saved for backward)
        queries, key_count = query.shape[0], keys.tail_start + keys.tail[0].shape[0]
        calls.append((" ".join(e.name.lower() for e in prof.events()), shapes, queries,
                      key_count))
        return out

    monkeypatch.setattr(SDPAttention, "_window", window_alone)
    LocalOptimization(LAYOUT, fixed_window(3))(model, tokens.cuda()).loss.backward()
    assert len(calls) == model.config.num_layers
    for names, shapes, queries, key_count in calls:
        assert queries < key_count  # the window after its context: the bottom-right case
        assert "flash" in names, names[:2000]
        assert "attention_math" not in names, names[:2000]
        assert not [s for s in shapes if s[-2:] == (queries, key_count)], shapes


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("recompute", [None, "selective", "full-uniform"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window_on_gpu_equals_the_fp32_reference(dist_world_of_one, monkeypatch, dtype,
                                                 recompute):
    """Local Opt.'s loss and every gradient on the GPU, with and without activation
    recomputation, against the fp32 masked reference (:data:`TOLERANCES`: fp32 to fp32's,
    bf16 to the stated bf16 tolerance); in bf16 each window call runs under the flash kernel
    alone, so the numbers are flash's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    calls = []
    if dtype is torch.bfloat16:
        real = SDPAttention._window

        def flash_only(self, query, keys):
            calls.append(query.shape[0])
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return real(self, query, keys)

        monkeypatch.setattr(SDPAttention, "_window", flash_only)
    against_fp32_reference(3, dtype, recompute)
    assert dtype is torch.float32 or len(calls) >= preset_model("test").num_layers


@pytest.mark.gpu
@gpu
def test_the_gpu_comparison_tells_a_top_left_window(dist_world_of_one, monkeypatch):
    """Negative control on the GPU: a top-left aligned window is outside the tolerance."""
    monkeypatch.setattr(SDPAttention, "_window", _top_left_window)
    with pytest.raises(AssertionError, match="outside the torch.bfloat16 tolerance"):
        against_fp32_reference(3, torch.bfloat16)
