"""Activation offloading (kubetune_trainer.offload): what goes to host memory, that training is unchanged, and
that the memory trace counts the offloaded tensors as host memory, not GPU memory."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainer
torch = pytest.importorskip("torch")

from kubetune_trainer import offload  # noqa: E402
from kubetune_trainer.memtrace import plan_settings, trace_step  # noqa: E402
from kubetune_trainer.memtrace.counter import StorageCounter  # noqa: E402
from kubetune_trainer.memtrace.step import offload_transfers  # noqa: E402

LLAMA_WIDE = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 6,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1024}


class _Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _model(layers: int = 3, width: int = 256) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[_Block(width) for _ in range(layers)])


def _grads(model, x, hooks=None, checkpointing=False):
    model.zero_grad()
    ctx = hooks if hooks is not None else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with ctx:
        h = x
        for block in model:
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if checkpointing else block(h)
        loss = h.square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_step_gives_the_same_gradients_and_sends_activations_not_weights(checkpointing):
    model = _model()
    x = torch.randn(1024, 256)  # 1 MiB per hidden-wide activation, 4 MiB per MLP-wide one
    ref_loss, ref_grads = _grads(model, x, checkpointing=checkpointing)
    packed: list[torch.Tensor] = []
    hooks = offload.ActivationOffload(model.parameters(), torch.device("cpu"))
    original_pack = hooks.offloads

    def offloads(tensor):
        decision = original_pack(tensor)
        if decision:
            packed.append(tensor)
        return decision

    hooks.offloads = offloads
    loss, grads = _grads(model, x, hooks, checkpointing=checkpointing)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert hooks.offloaded == len(packed) > 0
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    assert not any(t.untyped_storage()._cdata in params for t in packed)  # weights (and their views) stay
    assert all(t.numel() * t.element_size() >= offload.MIN_OFFLOAD_BYTES for t in packed)
    if checkpointing:
        # what checkpointing keeps: each block's input (and the loss's input), nothing the recomputation saves
        assert {t.shape[-1] for t in packed} == {256}
    else:
        assert {t.shape[-1] for t in packed} == {256, 1024}  # block inputs and the MLP-wide activations


def test_small_tensors_and_parameters_stay_on_the_device():
    weight = torch.nn.Parameter(torch.randn(1024, 1024))
    hooks = offload.ActivationOffload([weight], torch.device("cpu"))
    assert not hooks.offloads(weight) and not hooks.offloads(weight.t())
    assert not hooks.offloads(torch.empty(1024, 255))  # just under 1 MiB
    assert hooks.offloads(torch.empty(1024, 256))


def test_trace_counts_offloaded_tensors_as_host_memory():
    counter = StorageCounter()
    x = torch.randn(1024, 512, requires_grad=True)
    with counter, offload_transfers(counter):
        with offload.ActivationOffload([], torch.device("cpu")):
            y = (x * 2).sin()  # sin saves its 2 MiB input: offloaded, and the device copy is freed
        assert counter.host_bytes == 2 << 20
        assert counter.allocated == 2 << 20  # y only
        y.sum().backward()  # the input comes back as a new device tensor, counted in the peak
        assert counter.peak_bytes >= 3 * (2 << 20)
    assert counter.max_host_bytes == 2 << 20


def test_offloading_lowers_the_traced_gpu_peak_by_the_checkpointed_inputs():
    common = dict(micro_batch_size=2, seq_length=512, lora_r=8, packing=True)
    plain = trace_step(plan_settings("lora", **common), LLAMA_WIDE)
    offloaded = trace_step(plan_settings("lora", activation_offloading=True, **common), LLAMA_WIDE)
    layer_input = 2 * 512 * 512 * 2  # bf16 [2, 512, 512]
    assert plain.host_activation_bytes == 0
    # every checkpointed layer input but the one being recomputed waits in host memory
    assert offloaded.host_activation_bytes >= 5 * layer_input
    # the peak moves from the last layer's recompute to the first's: all but ~one input fewer on the GPU (the
    # adapters' gradients of the later layers exist by then)
    assert plain.breakdown["activations"] - offloaded.breakdown["activations"] >= 4 * layer_input
    assert offloaded.peak_bytes < plain.peak_bytes
    assert offloaded.breakdown["weights"] == plain.breakdown["weights"]
    assert "offloaded activations" in offloaded.format_text()
    # the host RAM the sizer asks for matches what the trace sent to host memory
    from kubetune.sizing import TrainingSetup, architecture_from_config
    from kubetune.sizing.estimator import offloaded_activation_bytes

    setup = TrainingSetup(method="lora", lora_r=8, micro_batch_size=2, seq_length=512, packing=True,
                          activation_offloading=True)
    host = offloaded_activation_bytes(architecture_from_config(LLAMA_WIDE, name="wide"), setup)
    # (the estimate counts two hidden-sized tensors for the loss; at this small vocabulary one reaches the hooks)
    assert 1.0 <= host / offloaded.host_activation_bytes <= 1.15


def test_estimate_cli_traces_offloading_and_shows_the_host_ram(tmp_path, capsys):
    import json

    from kubetune.sizing.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_WIDE))
    flags = ["--config", str(config), "--method", "lora", "--seq", "512", "--batch", "2", "--r", "8"]
    assert main([*flags, "--activation-offloading", "--trace", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"]["hostActivationBytes"] >= 6 * 2 * 512 * 512 * 2  # six layer inputs, bf16
    assert main([*flags, "--activation-offloading"]) == 0
    assert "host RAM (offload)" in capsys.readouterr().out
