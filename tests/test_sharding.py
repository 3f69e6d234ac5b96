"""Sharded params on a 2 x 4 mesh of host devices (tests/sharded_run.py).

The run needs 8 devices before jax starts, so it is a subprocess; the rest
of the suite keeps one device. Both lowerings are checked: "tpu" (the
generic one XLA:TPU and XLA:GPU get) and this CPU's own.
"""

import json
import os
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).with_name("sharded_run.py")
MOVES_DATA = ("all-gather", "all-to-all", "collective-permute")


def sharded_run() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, str(SCRIPT), "tpu", "this"],
                        env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_sharded_params_on_a_2x4_mesh():
  # One test, one subprocess: pytest-xdist would start one per worker.
  out = sharded_run()
  assert out["devices"] == 8
  for machine in ("tpu", "this"):
    run = dict(out, machine=machine, runs=out["runs"][machine])
    check_shardings_kept(run)
    check_equal_to_single_device(run)
    check_per_channel_moves_no_weights(run)
    check_grouped_tensor_parallel(run)
  check_checkpoints_calibration_and_qat(out)


def check_shardings_kept(run):
  for name, r in run["runs"].items():
    layout = name.split()[0]
    up, down = ((("None, 'model'"), ("'model', None")) if layout == "megatron"
                else (("'data', None"), ("'data', None")))
    assert r["values"] == {"up": f"P({up})", "down": f"P({down})"}, name
    grouped = "g32" in name
    # Per-channel scales (1, N) follow a sharded output axis and are
    # replicated otherwise; per-group scales (groups, N) follow the
    # weight on both axes.
    want_up = f"P({up})" if grouped or layout == "megatron" else "P()"
    want_down = f"P({down})" if grouped else "P()"
    assert r["scale"] == {"up": want_up, "down": want_down}, name
    assert r["out_spec"] == "P('data',)", name


def check_equal_to_single_device(run):
  for name, r in run["runs"].items():
    if name.endswith("W8A8"):
      assert r["max_diff"] == 0.0, name
    else:
      # Float sums in another order; in the int8 paths at most an
      # activation code flipped by that (measured 0 to 3e-3 on outputs of
      # magnitude 2.5).
      assert r["max_diff"] < 5e-3, (name, r["max_diff"])
    assert r["int8_ops"] >= (2 if "A8" in name else 0), name


def check_per_channel_moves_no_weights(run):
  # Per-channel weights add no all-gather / all-to-all / permute to the
  # float model's; the only new collective is the all-reduce of a per-row
  # activation scale over a sharded contraction (the row-parallel `down`,
  # M floats), and only where activations are quantized.
  for name, r in run["runs"].items():
    if "g32" in name:
      continue
    fc, qc = r["float_collectives"], r["quant_collectives"]
    for c in MOVES_DATA:
      assert qc[c] <= fc[c], (name, c, qc, fc)
    extra = 1 if name == "megatron W8A8" else 0
    assert qc["all-reduce"] <= fc["all-reduce"] + extra, (name, qc, fc)
    # Nor more bytes: in FSDP, W8A8 moves int8 codes where float moves
    # float32 weights (measured 12 KB vs 48 KB).
    assert r["quant_moved"] <= r["float_moved"], (name, r)


def check_grouped_tensor_parallel(run):
  if run["machine"] != "tpu":
    return  # this CPU's per-group dots slice the contraction (README)
  for name in ("megatron W4A16 g32", "megatron W4A8 g32"):
    fc, qc = (run["runs"][name][k] for k in ("float_collectives",
                                             "quant_collectives"))
    for c in MOVES_DATA:
      assert qc[c] == fc[c] == 0, (name, qc)


def check_checkpoints_calibration_and_qat(run):
  assert run["loaded"] == {"values": "P(None, 'model')",
                           "scale": "P(None, 'model')", "equal": True}
  assert run["calibration_equal"]
  # Abstract params with shardings, values from a host-side source: each
  # leaf is placed sharded before it is quantized.
  assert run["from_source"] == {"up": "P(None, 'model')",
                                "down": "P('model', None)", "equal": True}
  qat = run["qat"]
  assert qat["grad_spec"] == "P(None, 'model')"
  assert qat["max_diff"] <= 1e-5 * qat["scale"]
