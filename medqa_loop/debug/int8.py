"""Which activation columns bitsandbytes' LLM.int8 matmul split off into fp16, per 8-bit layer:
read by the gradient trace (``int8_outliers``) and the self-test report."""

from __future__ import annotations

from functools import partial

from medqa_loop.model import is_int8_linear, module_name


class Int8Outliers:
    """Per 8-bit layer, the activation columns LLM.int8 split off into its fp16 matmul.

    bitsandbytes stores the outlier columns it used (``|x| >= llm_int8_threshold`` anywhere in
    the column) in ``module.state.idx``; we clear it before each forward and read it after, so a
    layer appears only when that path really ran. bitsandbytes 0.50 takes it on CUDA, and on the
    CPU only in eval mode: CPU training dequantizes the weights and multiplies in fp32.
    With a threshold of 0 there is no outlier split, so nothing is recorded.
    """

    def __init__(self, model):
        self.active = True
        self.columns: dict[str, set[int]] = {}
        self.handles = []
        for name, module in model.named_modules():
            if is_int8_linear(module):
                self.handles.append(module.register_forward_pre_hook(self._clear))
                self.handles.append(module.register_forward_hook(partial(self._record, module_name(name))))

    @staticmethod
    def _clear(module, args) -> None:
        module.state.idx = None

    def _record(self, name: str, module, args, output) -> None:
        if self.active and module.state.idx is not None:
            self.columns.setdefault(name, set()).update(module.state.idx.tolist())

    def counts(self) -> dict[str, int]:
        return {name: len(cols) for name, cols in self.columns.items()}

    def reset(self) -> None:
        self.columns = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
