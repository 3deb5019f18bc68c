"""The TRL drop-in's loss under DeepSpeed ZeRO-3, where lm_head.weight is partitioned across ranks.

ZeRO-3 keeps each parameter as this rank's 1/P slice and an empty `param.data`. Hooks on every module gather
the module's parameters before its forward, again before its backward (a hook on the forward's output
tensors), and partition them after each (a hook on its input tensors). PyTorch accumulates a parameter's
gradient only while `param.data` has the gradient's shape, so the lm_head weight must be gathered both when
the loss reads it and when its gradient arrives.

Under ZeRO-3 softpo's loss therefore runs as the forward of the lm_head module itself, called with the last
hidden states: lm_head's own hooks gather the weight around the loss's forward and its backward, and release
it once d hidden has left, exactly as for the logits TRL's head computes. Every objective is covered, token-
or sequence-level, on the torch or the Triton path, whether its backward re-reads the weight or not, and
tied embeddings are gathered as for any tied head. ZeRO-3's gradient hook then reduce-scatters the full
d weight into this rank's partition.

The alternatives DeepSpeed offers do not fit:
- `deepspeed.zero.GatheredParameters` around the loss: the gather ends with the forward, but a gradient
  reaches the parameter only in the backward (even d weight formed during the forward, as on the fused
  Triton path), when the weight is empty and PyTorch refuses it. Inside the engine's forward, a read of a
  partitioned parameter also gathers it and registers it with the running module, and the context's exit
  then refuses to free it.
- `deepspeed.zero.register_external_parameter(model, weight)`: the model's backward hook sits on the tensors
  the model returns, which softpo's output dataclass hides, and the release waits for gradient at the
  model's inputs, token ids that carry none.
So the root model's forward must not read lm_head.weight under ZeRO-3; only the head's forward does.
"""

from __future__ import annotations

from ..head import run_as_forward

__all__ = ["head_loss"]


def head_loss(model, loss_fn, outputs):
    """`loss_fn(outputs, weight)`, which returns `(out, aux)`, run as the forward of `model`'s lm_head, called
    with the last hidden states."""
    head = model.get_output_embeddings()
    aux = []

    def loss_in_head(hidden):
        # `hidden` is the tensor ZeRO-3's input hook has wrapped, through which the release after the backward
        # is triggered; the head's weight is gathered while this runs.
        outputs.last_hidden_state = hidden
        out, aux_loss = loss_fn(outputs, head.weight)
        # The router loss does not read the head: it leaves the head's forward by this side door, so that
        # its backward does not gather the weight again.
        aux.append(aux_loss)
        # The loss as a plain tensor of the output: ZeRO-3's backward hook for the head is attached to it.
        return out.loss, out

    loss, out = run_as_forward(head, loss_in_head, outputs.last_hidden_state)
    out.loss = loss
    return out, aux[0]
