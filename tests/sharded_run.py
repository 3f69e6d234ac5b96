"""Runs jaxquant on sharded params over 8 host devices; prints JSON facts.

`python tests/sharded_run.py tpu this`: per lowering ("tpu": the generic
one; "this": this machine's), per layout and recipe, the shardings, the
difference to a single-device run and the compiled HLO's collectives.
Run by tests/test_sharding.py in a subprocess (XLA_FLAGS must give 8 CPU
devices before jax starts; the rest of the suite keeps one). A 2 x 4 mesh
("data", "model"): a Megatron MLP (column-parallel `up`, row-parallel
`down`) with the batch on "data", and an FSDP MLP (both kernels sharded
along their contraction axis on "data").
"""

import itertools
import json
import os
import re
import sys
import tempfile

if __name__ == "__main__":  # imported (doctest collection), it changes nothing
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa

import jaxquant as jq  # noqa: E402

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")
RECIPES = {
    "W8A8": dict(weight=jq.int8(), act=jq.int8()),
    "W8A16": dict(weight=jq.int8()),
    "W4A16 g32": dict(weight=jq.int4(group_size=32)),
    "W4A8 g32": dict(weight=jq.int4(group_size=32), act=jq.int8()),
}
LAYOUTS = {  # kernel specs of (up, down), and the batch's
    "megatron": ((P(None, "model"), P("model", None)), P("data", None)),
    "fsdp": ((P("data", None), P("data", None)), P("data", None)),
}


class MLP(nn.Module):
  hidden: int = 256
  out: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="up")(x))
    return nn.Dense(self.out, name="down")(x)


def spec_of(a):
  return str(a.sharding.spec) if a is not None and hasattr(
      a.sharding, "spec") else None


def collectives(compiled_text: str) -> dict:
  return {c: compiled_text.count(f" {c}(") + compiled_text.count(
      f" {c}-start(") for c in COLLECTIVES}


BYTES = {"s8": 1, "u8": 1, "pred": 1, "bf16": 2, "f16": 2, "f32": 4, "s32": 4}


def moved_bytes(compiled_text: str) -> int:
  """Bytes that the all-gathers, all-to-alls and collective-permutes of a
  compiled HLO module produce (per device): the data they move."""
  total = 0
  for line in compiled_text.splitlines():
    m = re.search(r"= (.+?) (?:all-gather|all-to-all|collective-permute)"
                  r"(?:-start)?\(", line)
    if m:
      for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
        total += BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",")
                                             if d]))
  return total


def placed(params, x, layout: str):
  """`params` and `x` on the 2 x 4 mesh, sharded as `LAYOUTS[layout]`."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  named = lambda spec: NamedSharding(mesh, spec)
  (up, down), batch = LAYOUTS[layout]
  shardings = {"params": {"up": {"kernel": named(up), "bias": named(P())},
                          "down": {"kernel": named(down), "bias": named(P())}}}
  return jax.device_put(params, shardings), jax.device_put(x, named(batch))


def fsdp_bytes(d: int) -> dict:
  """Bytes moved by an FSDP MLP (d -> 4d -> d, 16 rows), float vs each
  recipe and lowering: `python tests/sharded_run.py bytes 1024`."""
  model = MLP(4 * d, d)
  x = jax.random.normal(jax.random.key(1), (16, d))
  sp, sx = placed(model.init(jax.random.key(0), x), x, "fsdp")
  out = {"float": moved_bytes(
      jax.jit(model.apply).lower(sp, sx).compile().as_text())}
  recipes = dict(RECIPES, **{"W4A8 g128": dict(weight=jq.int4(group_size=128),
                                               act=jq.int8())})
  for name in ("W8A8", "W8A16", "W4A8 g128"):
    recipe = jq.Recipe([jq.Rule(r".*kernel", **recipes[name])])
    qp = jq.quantize_params(model.apply, sp, recipe, sx, progress=False)
    for machine in ("tpu", None):
      qapply = jax.jit(jq.quantized_apply(model.apply, recipe,
                                          machine=machine))
      out[f"{name} {machine or 'this'}"] = moved_bytes(
          qapply.lower(qp, sx).compile().as_text())
  return out


def main(keys):
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (16, 128))
  params = model.init(jax.random.key(0), x)
  out = {"devices": jax.device_count(), "runs": {k: {} for k in keys}}
  for layout in LAYOUTS:
    sp, sx = placed(params, x, layout)
    float_hlo = jax.jit(model.apply).lower(sp, sx).compile().as_text()
    for key, name in itertools.product(keys, RECIPES):
      machine = None if key == "this" else key
      recipe = jq.Recipe([jq.Rule(r".*kernel", **RECIPES[name])])
      qp = jq.quantize_params(model.apply, sp, recipe, sx, progress=False)
      qapply = jax.jit(jq.quantized_apply(model.apply, recipe,
                                          machine=machine))
      sharded = qapply(qp, sx)
      single = qapply(jax.device_get(qp), np.asarray(x))
      q_hlo = qapply.lower(qp, sx).compile().as_text()
      kernels = {k: qp["params"][k]["kernel"] for k in ("up", "down")}
      out["runs"][key][f"{layout} {name}"] = {
          "values": {k: spec_of(q.values) for k, q in kernels.items()},
          "scale": {k: spec_of(q.scale) for k, q in kernels.items()},
          "scale_shape": {k: list(q.scale.shape) for k, q in kernels.items()},
          "out_spec": spec_of(sharded),
          "max_diff": float(np.abs(np.asarray(sharded)
                                   - np.asarray(single)).max()),
          "float_collectives": collectives(float_hlo),
          "quant_collectives": collectives(q_hlo),
          "float_moved": moved_bytes(float_hlo),
          "quant_moved": moved_bytes(q_hlo),
          "int8_ops": jq.int8_ops(qapply, qp, sx).stablehlo,
      }
      if layout == "megatron" and name == "W8A8" and key == keys[0]:
        with tempfile.TemporaryDirectory() as tmp:
          path = os.path.join(tmp, "q.jq")
          jq.save(path, qp)
          loaded = jq.load(path, like=qp)
        from_source = jq.quantize_params(
            model.apply, jq.sources.abstract(sp), recipe, sx,
            source=jq.sources.tree(jax.device_get(params)), progress=False)
        out["from_source"] = {
            k: spec_of(from_source["params"][k]["kernel"].values)
            for k in ("up", "down")}
        out["from_source"]["equal"] = bool(jax.tree.all(jax.tree.map(
            lambda a, b: bool(jnp.all(a == b)), from_source, qp)))
        k = loaded["params"]["up"]["kernel"]
        out["loaded"] = {"values": spec_of(k.values),
                         "scale": spec_of(k.scale),
                         "equal": bool(jax.tree.all(jax.tree.map(
                             lambda a, b: bool(jnp.all(a == b)), loaded,
                             qp)))}
    if layout == "megatron":
      recipe = jq.Recipe([jq.Rule(r".*kernel", **RECIPES["W8A8"])])
      batches = [sx, 2 * sx]
      stats = jq.calibrate(model.apply, sp, recipe, batches, progress=False)
      ref = jq.calibrate(model.apply, params, recipe, [x, 2 * x],
                         progress=False)
      out["calibration_equal"] = all(
          np.allclose(a, b) for p in ref.states for a, b in zip(
              stats.act_range(p), ref.act_range(p)))
      loss = lambda p, x: jnp.mean(jq.fake_quant_apply(
          model.apply, recipe)(p, x) ** 2)
      grads = jax.jit(jax.grad(loss))(sp, sx)
      ref_grads = jax.grad(loss)(params, x)
      g, r = (grads["params"]["up"]["kernel"],
              ref_grads["params"]["up"]["kernel"])
      out["qat"] = {"grad_spec": spec_of(g), "max_diff": float(
          np.abs(np.asarray(g) - np.asarray(r)).max()),
                    "scale": float(np.abs(np.asarray(r)).max())}
  print(json.dumps(out))


if __name__ == "__main__":
  if sys.argv[1:2] == ["bytes"]:
    print(json.dumps(fsdp_bytes(int(sys.argv[2]))))
  else:
    main(sys.argv[1:])
