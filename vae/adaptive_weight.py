"""Adaptive loss weighting: balance an auxiliary loss against the reconstruction NLL at one layer's weight.

Both SSVAE's adversarial term (at the decoder's last conv) and its LCR term (at the encoder's last conv) are scaled by
    ||d NLL / d W|| / (||d aux / d W|| + eps), clamped to [0, max_value] and detached,
so that the auxiliary gradient reaching W has roughly the size of the reconstruction gradient (VQGAN's recipe).
"""
from __future__ import annotations

import torch

from infra.zero3 import side_backward

ADAPTIVE_WEIGHT_EPS = 1e-4


def _grad_norm(loss: torch.Tensor, layer_weight: torch.Tensor, loss_name: str, aux_name: str) -> torch.Tensor:
    if not loss.requires_grad:
        raise ValueError(f"adaptive weight of the {aux_name} term: the {loss_name} loss has no autograd graph "
                         f"(computed under no_grad or on detached tensors), so its gradient w.r.t. the last layer "
                         f"cannot be measured")
    with side_backward():  # under ZeRO-3 this pass must not use up the training backward's weight gathers
        (grad,) = torch.autograd.grad(loss, layer_weight, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(f"adaptive weight of the {aux_name} term: the {loss_name} loss does not depend on the "
                         f"given last-layer weight (shape {tuple(layer_weight.shape)}); pass the weight of the layer "
                         f"that produces its input (encoder's last conv for LCR, decoder's last conv for the GAN "
                         f"term), and keep it trainable")
    return torch.linalg.vector_norm(grad)


def adaptive_weight(nll: torch.Tensor, aux_loss: torch.Tensor, layer_weight: torch.Tensor, max_value: float,
                    aux_name: str = "auxiliary") -> torch.Tensor:
    """Detached scalar ||grad nll|| / (||grad aux_loss|| + 1e-4), clamped to [0, max_value], both grads w.r.t.
    ``layer_weight``. The graphs are retained so the caller can still backpropagate the total loss.

    Raises ValueError (naming the loss) when either loss does not reach ``layer_weight``: a silent fallback would
    hide a wiring mistake (wrong layer, frozen encoder with LCR on) for a whole run.
    """
    if not isinstance(layer_weight, torch.Tensor) or not layer_weight.requires_grad:
        raise ValueError(f"adaptive weight of the {aux_name} term: the last-layer weight must be a tensor that "
                         f"requires grad")
    nll_norm = _grad_norm(nll, layer_weight, "reconstruction NLL", aux_name)
    aux_norm = _grad_norm(aux_loss, layer_weight, aux_name, aux_name)
    return torch.clamp(nll_norm / (aux_norm + ADAPTIVE_WEIGHT_EPS), 0.0, max_value).detach()
