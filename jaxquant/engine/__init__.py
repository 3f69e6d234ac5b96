"""Int8 execution: payloads of quantized weights, kernels, handlers.

`quantize_params`, `quantized_apply`, `fake_quant_apply` and `report` trace
the user's unmodified `apply_fn(params, *args, **kwargs)` once per abstract
signature (`jaxquant.transform`) and evaluate it, handing every
`dot_general` / `conv_general_dilated` that has a parameter operand to a
handler's `on_matmul`: `payloads` (what a quantized weight carries),
`plan` (how each matmul runs, and why: the one place that decides),
`kernels` (the int8 matmuls), `handlers` (what each mode computes).
"""

from jaxquant.engine import lowering, plan
from jaxquant.engine.handlers import (FakeQuantHandler, ObserveHandler,
                                      OpRecord, QuantizedHandler)
from jaxquant.engine.payloads import QuantPayload
from jaxquant.engine.plan import (FLOAT, FP8, INT8, WEIGHT_ONLY, Plan,
                                  check_act_specs)
