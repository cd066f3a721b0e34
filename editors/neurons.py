"""Added neurons: extra key-value neurons held beside one MLP of the model.

For the MLP at a module path, with input x (the hidden state the MLP reads) and its output
out(x), the added neurons make the output

    out'(x) = out(x) + act(x K^T + b) V

K [n, d_model] keys, b [n] biases, V [n, d_model] values, and per neuron an activation (ReLU,
GELU, its tanh approximation, or SiLU). It is the MLP's own key-value form (Geva et al.,
2021) with n more neurons, so T-Patcher's one neuron per mistake and CaliNet's calibration
slots are both this. The neurons are no parameters of the model: like GRACE's codebook they
live on the module as plain state read by one forward hook (so a deep copy carries them,
the state dict and the weights' bytes never change), and applying or reverting a patch only
swaps the module's neurons. Later patches' neurons are concatenated after the earlier ones.

The added output is computed in fp32 from the stored fp32 tensors and cast to the output's
dtype, so serving, replaying and computing an edit give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .codebook import io_dims
from .errors import PatchError

_ATTRIBUTE = "editserve_neurons"
_HOOKED = "editserve_neurons_hooked"

# Activation codes, stored per neuron in a patch: never renumber.
ACTIVATIONS: dict[str, int] = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
# transformers' activation names of the supported families, to ours
_FAMILY_NAMES = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


def activation_code(name: str) -> int:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def family_activation(model: nn.Module) -> str:
    """The activation the model's own MLPs use (GELU where the config names none we know)."""
    config = getattr(model, "config", None)
    for attribute in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(config, attribute, None)
        if isinstance(name, str) and name in _FAMILY_NAMES:
            return _FAMILY_NAMES[name]
    return "gelu"


def activate(
    pre: torch.Tensor, codes: torch.Tensor, kinds: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Each column j of `pre` [..., n] through the activation of code `codes[j]` (`kinds`:
    the distinct codes, when the caller knows them: no read of `codes` from the device)."""
    if kinds is None:
        kinds = tuple(sorted({int(c) for c in codes.tolist()}))
    if len(kinds) == 1:
        return _activation(kinds[0], pre)
    out = torch.zeros_like(pre)
    for kind in kinds:
        out = torch.where(codes.to(pre.device) == kind, _activation(kind, pre), out)
    return out


def _activation(code: int, pre: torch.Tensor) -> torch.Tensor:
    if code == 0:
        return F.relu(pre)
    if code == 1:
        return F.gelu(pre)
    if code == 2:
        return F.gelu(pre, approximate="tanh")
    if code == 3:
        return F.silu(pre)
    raise ValueError(f"unknown activation code {code}")


def added_output(
    inputs: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    values: torch.Tensor,
    codes: torch.Tensor,
    kinds: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """act(x K^T + b) V for inputs [..., d_model], in fp32 (differentiable: the methods
    train their neurons through this same function)."""
    pre = inputs.float() @ keys.float().T + bias.float()
    return activate(pre, codes, kinds) @ values.float()


@dataclass(frozen=True)
class AddedNeurons:
    keys: torch.Tensor  # [n, d_model]
    bias: torch.Tensor  # [n]
    values: torch.Tensor  # [n, d_model]
    activations: torch.Tensor  # [n] activation codes (ACTIVATIONS), int64
    _kinds: tuple[int, ...] = field(init=False, repr=False, compare=False)  # distinct codes

    def __post_init__(self) -> None:
        n = self.keys.shape[0]
        if self.keys.dim() != 2 or self.values.dim() != 2 or self.values.shape[0] != n:
            raise ValueError("added neurons need keys [n, d_in] and values [n, d_out]")
        if tuple(self.bias.shape) != (n,) or tuple(self.activations.shape) != (n,):
            raise ValueError("added neurons need one bias and one activation per neuron")
        kinds = {int(c) for c in self.activations.tolist()}
        if not kinds <= set(ACTIVATIONS.values()):
            raise ValueError("added neurons name an unknown activation")
        object.__setattr__(self, "_kinds", tuple(sorted(kinds)))

    @classmethod
    def of(
        cls, keys: torch.Tensor, bias: torch.Tensor, values: torch.Tensor, activation: str
    ) -> AddedNeurons:
        """Neurons that all use `activation`, stored as contiguous fp32 on the CPU."""
        code = activation_code(activation)
        return cls(
            keys.detach().float().cpu().contiguous(),
            bias.detach().float().cpu().contiguous(),
            values.detach().float().cpu().contiguous(),
            torch.full((keys.shape[0],), code, dtype=torch.long),
        )

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def extended(self, more: AddedNeurons) -> AddedNeurons:
        device = self.keys.device
        return AddedNeurons(
            torch.cat([self.keys, more.keys.to(device)]),
            torch.cat([self.bias, more.bias.to(device)]),
            torch.cat([self.values, more.values.to(device)]),
            torch.cat([self.activations, more.activations.to(device)]),
        )

    def to(self, device: torch.device | str) -> AddedNeurons:
        return AddedNeurons(
            self.keys.to(device),
            self.bias.to(device),
            self.values.to(device),
            self.activations.to(device),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """By part name, as a patch stores them."""
        return {
            "keys": self.keys.float().contiguous(),
            "bias": self.bias.float().contiguous(),
            "values": self.values.float().contiguous(),
            "activations": self.activations.long().contiguous(),
        }

    @classmethod
    def from_tensors(cls, parts: dict[str, torch.Tensor]) -> AddedNeurons:
        return cls(parts["keys"], parts["bias"], parts["values"], parts["activations"])

    def output(self, inputs: torch.Tensor) -> torch.Tensor:
        return added_output(
            inputs, self.keys, self.bias, self.values, self.activations, self._kinds
        )


def _neurons_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    neurons: AddedNeurons | None = getattr(module, _ATTRIBUTE, None)
    if neurons is None or len(neurons) == 0:
        return None
    inputs = args[0] if args else next(iter(kwargs.values()))
    # with autograd as the caller has it: a method computing an edit on top of these
    # neurons backpropagates through them to the layers below (the neurons get no gradient)
    return output + neurons.output(inputs).to(output.dtype)


def neurons_of(module: nn.Module) -> AddedNeurons | None:
    return getattr(module, _ATTRIBUTE, None)


def set_neurons(module: nn.Module, neurons: AddedNeurons | None) -> None:
    """Give `module` these added neurons (None: none); the hook is registered on first use."""
    if neurons is not None:
        parameter = next(module.parameters(), None)
        if parameter is not None:
            neurons = neurons.to(parameter.device)
        if not getattr(module, _HOOKED, False):
            module.register_forward_hook(_neurons_hook, with_kwargs=True)
            setattr(module, _HOOKED, True)
    setattr(module, _ATTRIBUTE, neurons)


def mlp_path(mlp_out_path: str) -> str:
    """The MLP module holding the output projection at `mlp_out_path` (its parent)."""
    return mlp_out_path.rpartition(".")[0]


def neuron_module(model: nn.Module, path: str, neurons: AddedNeurons) -> nn.Module:
    """The MLP module at `path`, checked to take neurons of `neurons`' width: some linear
    layer in it reads d_model (the keys' width) and some writes it (the values')."""
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise PatchError(f"model has no module {path!r}", field="patch") from exc
    dims = [d for child in module.children() if (d := io_dims(child)) is not None]
    d_in, d_out = int(neurons.keys.shape[1]), int(neurons.values.shape[1])
    if not any(i == d_in for i, _ in dims) or not any(o == d_out for _, o in dims):
        raise PatchError(
            f"added neurons for {path} map {d_in} -> {d_out}, the module's layers {dims}",
            field="patch",
        )
    return module


# -- for the methods that train added neurons ---------------------------------------------------

# Neutral text whose MLP inputs stand for "everything else" (T-Patcher's memory, CaliNet's
# locality), besides the context prefixes sampled from the model.
MEMORY_TEXTS = (
    "The weather was mild for most of the week, with some rain on Sunday.",
    "She opened the window and looked out over the quiet street.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The committee will meet again next month to discuss the budget.",
    "He has been playing the piano since he was a child.",
    "The train to the airport leaves every twenty minutes.",
    "Many people enjoy reading a book in the evening.",
    "The city is known for its old bridges and narrow streets.",
)


def check_activation(name: str, field: str = "activation") -> None:
    from .errors import InvalidValueError

    if name != "family" and name not in ACTIVATIONS:
        known = ", ".join(["family", *sorted(ACTIVATIONS)])
        raise InvalidValueError(f"{field} must be one of {known}", field=field)


def resolve_activation(model: nn.Module, name: str) -> str:
    return family_activation(model) if name == "family" else name


def memory_batch(
    tok: Any, texts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of `texts` (empty texts left out)."""
    from .core.keys import pad_id_of, right_padded
    from .tokens import encode_prompt

    rows = [encode_prompt(tok, text) for text in texts if text.strip()]
    return right_padded(rows, pad_id_of(tok), device)


@torch.no_grad()
def residual_norm(
    model: nn.Module, block: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The norm of the residual stream after `block` (a decoder layer) at every position
    [b, t]: the scale an added output is measured against."""
    seen: dict[str, torch.Tensor] = {}

    def read(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        seen["norm"] = hidden.detach().float().norm(dim=-1)

    handle = block.register_forward_hook(read)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return seen["norm"]


@torch.no_grad()
def read_io(
    model: nn.Module, module: nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output of `module` at every position ([b, t, d] each, fp32), on the
    model as it is now (added neurons included)."""
    seen: dict[str, torch.Tensor] = {}

    def read(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        inputs = args[0] if args else next(iter(kwargs.values()))
        seen["in"], seen["out"] = inputs.detach().float(), output.detach().float()

    handle = module.register_forward_hook(read, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    return seen["in"], seen["out"]


class Training:
    """New neurons being trained at `module`: while installed, every forward adds
    act(x K^T + b) V with gradients, and `inputs` holds the module's last input."""

    def __init__(
        self,
        module: nn.Module,
        keys: torch.Tensor,
        bias: torch.Tensor,
        values: torch.Tensor,
        activation: str,
    ) -> None:
        self.module = module
        self.keys, self.bias, self.values = keys, bias, values
        self.code = activation_code(activation)
        self.codes = torch.full((keys.shape[0],), self.code, dtype=torch.long)
        self.activation = activation
        self.inputs: torch.Tensor | None = None
        self._handle: Any = None

    def _hook(
        self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        inputs = args[0] if args else next(iter(kwargs.values()))
        self.inputs = inputs.detach().float()
        extra = added_output(inputs, self.keys, self.bias, self.values, self.codes, (self.code,))
        return output + extra.to(output.dtype)

    def __enter__(self) -> Training:
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def pre_activations(self, queries: torch.Tensor) -> torch.Tensor:
        return queries.float() @ self.keys.T + self.bias

    def result(self) -> AddedNeurons:
        return AddedNeurons.of(self.keys, self.bias, self.values, self.activation)
