"""Dynamic convolution: the batched grouped conv equals the per-sample loop, and deploys exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import QUICK, block_geometry, compose, randomize_norms, relative_error
from hypothesis import given
from hypothesis import strategies as st

import repnet
from repnet import PRESETS
from repnet.branches import ChannelScale
from repnet.callbacks import TemperatureAnnealing
from repnet.deployment import deploy
from repnet.dynamic import DynamicConv2d
from repnet.errors import DeployError
from repnet.kernels import Conv
from repnet.training import train


def dynamic(geometry: dict, branches="plain", seed: int = 0, **options) -> DynamicConv2d:
    """A float64 dynamic conv with random BN statistics, branch scales and attention."""
    torch.manual_seed(seed)
    args = {k: v for k, v in geometry.items() if k != "image"}
    module = DynamicConv2d(**args, branches=branches, act=None, temperature=0.7, **options)
    module = randomize_norms(module.double(), seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, ChannelScale):
                sub.weight.uniform_(-1.5, 1.5)
        for parameter in module.attention.parameters():
            parameter.mul_(3.0)  # attention far from uniform, so mixing errors would show
    return module


def sample(geometry: dict, batch: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, geometry["in_channels"], *geometry["image"])
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def reference(module: DynamicConv2d, x: torch.Tensor) -> torch.Tensor:
    """Sample by sample, kernels mixed explicitly: ``conv(x_b, Σ_k a_bk W_k) + Σ_k a_bk b_k``."""
    weights, biases = module.expert_kernels()
    attention, geo = module.attend(x), module.geometry
    outputs = []
    for b in range(len(x)):
        weight = sum(attention[b, k] * weights[k] for k in range(len(weights)))
        bias = None if biases is None else attention[b] @ biases
        conv = Conv(weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)
        outputs.append(conv(x[b : b + 1]))
    y = torch.cat(outputs)
    return module.act(module.norm(y) if module.norm is not None else y)


@given(
    geometry=block_geometry(),
    strategy=st.sampled_from(["grouped", "per_sample"]),
    deployed=st.booleans(),
    branches=st.sampled_from(["plain", "repvgg"]),
    autograd=st.booleans(),
)
def test_both_strategies_equal_the_explicit_per_sample_mixture(
    geometry, strategy, deployed, branches, autograd
):
    """Deployed experts carry biases (the folded BN), trained ones do not: both are checked,
    with autograd and without (the kernels are mixed by a different product)."""
    module = dynamic(geometry, branches=branches, strategy=strategy).eval()
    if deployed:
        module.switch_to_deploy()
        with torch.no_grad():
            module.bias.normal_()  # experts with biases of their own, as after fine-tuning
    x = sample(geometry)
    with torch.set_grad_enabled(autograd):
        assert relative_error(reference(module, x), module(x)) <= 1e-10


@given(geometry=block_geometry(), branches=st.sampled_from(["plain", "acb"]))
def test_grouped_and_per_sample_gradients_agree(geometry, branches):
    """Gradients of the input and of every parameter, compared at the scale of them all."""
    gradients = {}
    for strategy in ("grouped", "per_sample"):
        module = dynamic(geometry, branches=branches, strategy=strategy).train()
        x = sample(geometry).requires_grad_()
        module(x).square().sum().backward()
        tensors = [x.grad] + [p.grad for p in module.parameters()]
        gradients[strategy] = torch.cat([t.flatten() for t in tensors])
    assert relative_error(gradients["per_sample"], gradients["grouped"]) <= 1e-10


@given(geometry=block_geometry(), branches=st.sampled_from(sorted(set(PRESETS) - {"plain"})))
def test_each_expert_kernel_is_its_branches_summed_and_bias_free(geometry, branches):
    """The kernel the mixture uses equals running the expert's branch modules themselves."""
    module = dynamic(geometry, branches=branches)
    x, geo = sample(geometry), module.geometry
    with torch.no_grad():
        weights, biases = module.expert_kernels()
        for expert, weight in zip(module.experts, weights, strict=True):
            expected = sum(branch(x) for branch in expert.values())
            conv = Conv(
                weight,
                torch.zeros(len(weight), dtype=weight.dtype),
                geo.stride,
                geo.padding,
                geo.dilation,
                geo.groups,
            )
            assert relative_error(expected, conv(x)) <= 1e-10
    assert biases is None


@given(geometry=block_geometry(), branches=st.sampled_from(sorted(PRESETS)))
def test_deployed_dynamic_conv_equals_the_trained_one(geometry, branches):
    module = dynamic(geometry, branches=branches).eval()
    x = sample(geometry)
    with torch.no_grad():
        expected = module(x)
        module.switch_to_deploy()
        assert module.deployed and module.norm is None
        assert relative_error(expected, module(x)) <= 1e-10
        module.switch_to_deploy()
        assert relative_error(expected, module(x)) <= 1e-10


def test_deploy_true_builds_the_deployed_form_that_loads_deployed_weights():
    trained = randomize_norms(DynamicConv2d(4, 6, 3, branches="dbb", num_experts=3)).eval()
    direct = DynamicConv2d(4, 6, 3, branches="dbb", num_experts=3, deploy=True).eval()
    x = torch.randn(2, 4, 9, 9)
    expected = trained(x)
    trained.switch_to_deploy()
    direct.load_state_dict(trained.state_dict())
    assert torch.allclose(direct(x), expected, rtol=1e-5, atol=1e-6)


def test_attention_is_the_softmax_of_the_mlp_of_channel_means():
    """``a(x) = softmax(W₂ relu(W₁ GAP(x) + b₁) + b₂) / τ)``, from the parameters themselves."""
    module = dynamic({"in_channels": 6, "out_channels": 4, "kernel_size": 3, "image": (7, 9)})
    x = sample({"in_channels": 6, "image": (7, 9)})
    (w1, b1), (w2, b2) = [(layer.weight, layer.bias) for layer in module.attention[::2]]
    means = x.sum((2, 3)) / (7 * 9)
    logits = torch.relu(means @ w1.T + b1) @ w2.T + b2
    expected = torch.softmax(logits / module.temperature, dim=1)
    assert relative_error(expected, module.attend(x)) <= 1e-12


def test_attention_pools_without_overflow_in_half_precision():
    """A sum over a 96x96 map of 10s is 92160, past float16's 65504: pooling must average
    (mixed-precision training on GPUs feeds the block float16 activations)."""
    module = DynamicConv2d(8, 8, 3).half()
    x = torch.full((2, 8, 96, 96), 10.0, dtype=torch.float16)
    assert module.attend(x).isfinite().all()


def test_plain_experts_start_live_and_distinct_and_the_attention_is_reduced():
    weight = DynamicConv2d(4, 6, 3, num_experts=3).weight
    assert weight.abs().amax((1, 2, 3, 4)).min() > 0  # no expert starts dead
    assert all(not torch.allclose(weight[i], weight[j]) for i in range(3) for j in range(i))
    assert "experts=3" in repr(DynamicConv2d(4, 6, 3, num_experts=3))
    assert DynamicConv2d(32, 8).attention[0].out_features == 32 // 4  # reduction 4


def test_state_dict_keys_are_those_earlier_checkpoints_hold():
    """Renaming a parameter breaks every saved checkpoint and deployed folder: keys are pinned."""
    module = DynamicConv2d(4, 4, 3, num_experts=2)
    attention = ["attention.0.weight", "attention.0.bias", "attention.2.weight", "attention.2.bias"]
    norm = ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"]
    assert set(module.state_dict()) == {
        "temperature",
        "weight",
        *attention,
        *norm,
        "norm.num_batches_tracked",
    }
    module.switch_to_deploy()
    assert set(module.state_dict()) == {"temperature", "weight", "bias", *attention}


def test_a_jit_trace_passes_its_check_trained_and_deployed():
    """The check re-runs the trace without autograd: both runs must take the same mixing."""
    module, x = DynamicConv2d(4, 6, 3).eval(), torch.randn(2, 4, 8, 8)
    for _ in range(2):
        traced = torch.jit.trace(module, x)
        assert torch.allclose(traced(x), module(x), rtol=1e-5, atol=1e-6)
        module.switch_to_deploy()


def test_attention_rows_sum_to_one_and_temperature_sharpens_them():
    module = DynamicConv2d(3, 3, num_experts=5)
    x = torch.randn(4, 3, 8, 8)
    soft = module.attend(x)
    module.temperature.fill_(0.01)
    sharp = module.attend(x)
    assert torch.allclose(soft.sum(1), torch.ones(4)) and torch.allclose(
        sharp.sum(1), torch.ones(4)
    )
    assert sharp.max(1).values.min() > soft.max(1).values.max()


def test_temperature_annealing_is_linear_then_flat():
    schedule = TemperatureAnnealing(start=30.0, end=1.0, epochs=11)
    assert [schedule.temperature(e) for e in (0, 5, 10, 20)] == [30.0, 15.5, 1.0, 1.0]
    one_epoch = TemperatureAnnealing(start=30.0, end=1.0, epochs=1)
    assert [one_epoch.temperature(e) for e in (0, 1)] == [30.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"num_experts": 0}, "num_experts"), ({"strategy": "magic"}, "strategy")],
)
def test_bad_options_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicConv2d(4, 4, **kwargs)


def test_dynamic_blocks_train_under_lightning_and_deploy(tmp_path):
    cfg = compose(["block=dynamic", "block.branches=acb", *QUICK, "logger=csv"])
    summary = train(cfg, tmp_path)
    assert summary["max_abs_diff"] < 1e-3 and summary["argmax_agreement"] == 1.0
    report = deploy(tmp_path / "checkpoints" / "last.ckpt", latency_seconds=0)
    deployed = repnet.load_deployed(report.out_dir)
    dynamic_convs = [m for m in deployed.modules() if isinstance(m, DynamicConv2d)]
    assert dynamic_convs and all(m.deployed for m in dynamic_convs)
    annealed = TemperatureAnnealing().temperature(1)  # the second (last) epoch's temperature
    assert all(m.temperature.item() == pytest.approx(annealed) for m in dynamic_convs)


def test_dynamic_models_export_for_a_fixed_batch(tmp_path):
    cfg = compose(["block=dynamic", *QUICK, "logger=csv", "trainer.max_epochs=1"])
    train(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(DeployError, match="export_batch"):
        deploy(last, export=["pt2"], out_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    report = deploy(
        last, export=["pt2", "onnx"], export_batch=4, out_dir=tmp_path / "out", latency_seconds=0
    )
    assert report.checks["pt2 vs deploy form"].max_rel < 1e-5
    assert report.checks["onnx vs deploy form"].max_rel < 1e-5
