"""`Rule` and `Recipe`: which parameters get which quantization.

A `Recipe` is an ordered list of rules. Each rule's `pattern` is a regex
matched with `re.fullmatch` against a parameter's '/'-joined path (e.g.
`params/Dense_0/kernel`); the first rule that matches wins. A rule gives the
weight spec (`None` keeps the parameter in float) and, for the int8 engine,
the spec of the activation that meets the weight in a matmul (`None` means
weight-only, e.g. W4A16). Mixed precision is just several rules.

Example:
  >>> import jaxquant as jq
  >>> recipe = jq.Recipe([
  ...     jq.Rule(r".*embedding", weight=None),            # keep float
  ...     jq.Rule(r".*Dense_0/kernel", weight=jq.int4(group_size=32)),
  ...     jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8()),
  ... ])
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from jaxquant import methods
from jaxquant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantize parameters whose path fully matches `pattern` with `weight`.

  Everything after the pattern is keyword-only: `Rule(r".*kernel",
  weight=jq.int8(), act=jq.int8())`.

  Attributes:
    pattern: regex, matched with `re.fullmatch` on the '/'-joined path.
    weight: spec for the parameter, or None to keep it in float.
    act: spec for the activation multiplied with it (None: weight-only).
    method: how the weight is rounded: None for round-to-nearest, or a
      post-training method, `jq.gptq()`, `jq.awq()` or `jq.smoothquant()`
      (`jaxquant.methods`), which needs calibration statistics
      (`jq.calibrate`).
    optional: if False, a rule that matches nothing is an error.

  A bad pattern (not a str, not a regex) or spec raises ValueError at
  construction, as do `act=` or `method=` without `weight=`.

  Example:
    >>> import jaxquant as jq
    >>> rule = jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8())
    >>> rule.matches("params/Dense_0/kernel"), rule.matches("params/bias")
    (True, False)
  """

  pattern: str
  _: dataclasses.KW_ONLY
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  method: methods.Gptq | methods.Awq | methods.SmoothQuant | None = None
  optional: bool = False

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise ValueError(f"Rule pattern must be a str regex matched against "
                       f"'/'-joined paths (e.g. r'.*kernel'), got "
                       f"{self.pattern!r}")
    if not isinstance(self.optional, bool):
      raise ValueError(f"Rule {self.pattern!r}: optional must be True or "
                       f"False, got {self.optional!r}")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule {self.pattern!r}: not a valid regex ({e})") from e
    for name in ("weight", "act"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, QuantSpec):
        raise ValueError(f"Rule {self.pattern!r}: {name} must be a QuantSpec "
                         f"(e.g. jq.int8()) or None, got {value!r}")
    if self.weight is None and self.act is not None:
      raise ValueError(
          f"Rule {self.pattern!r}: act= without weight= is not supported; "
          "quantize the weight too (e.g. weight=jq.int8()) or drop act")
    if self.method is not None:
      self._check_method()

  def _check_method(self):
    where = f"Rule {self.pattern!r}: method={self.method!r}"
    if not isinstance(self.method, methods.METHODS):
      raise ValueError(f"{where} is not a method; use jq.gptq(), jq.awq(), "
                       "jq.smoothquant() or None (round-to-nearest)")
    if self.weight is None:
      raise ValueError(f"{where} without weight=: a method rounds weights; "
                       "give the weight spec (e.g. weight=jq.int4())")
    if self.weight.rounding == "stochastic":
      raise ValueError(f"{where} rounds to nearest while compensating the "
                       "error; drop rounding='stochastic' from the weight")
    if self.weight.clip == "mse" and isinstance(self.method, methods.Gptq):
      raise ValueError(f"{where} takes each group's range as its columns are "
                       "reached; drop clip='mse' from the weight")
    if self.method.prescales and self.act is not None and isinstance(
        self.act.clip, tuple):
      raise ValueError(f"{where} divides the activation by a per-feature "
                       f"scale, so act clip={self.act.clip} no longer bounds "
                       "it; drop the act clip and calibrate (stats=) for a "
                       "static range")

  def matches(self, path: str) -> bool:
    """Whether `pattern` fully matches the '/'-joined `path`."""
    return re.fullmatch(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An ordered tuple of `Rule`s; the first rule matching a path wins.

  Paths no rule matches stay float. Model-level functions
  (`jq.quantize_params`, `jq.calibrate`, ...) raise ValueError for a
  non-optional rule that decides no parameter (see `check_used`).

  Args:
    rules: an iterable of `Rule`s (ValueError for anything else).

  Example:
    >>> import jaxquant as jq
    >>> recipe = jq.Recipe([
    ...     jq.Rule(r".*Dense_0/kernel", weight=jq.int4(group_size=32)),
    ...     jq.Rule(r".*kernel", weight=jq.int8(), act=jq.int8()),
    ... ])
    >>> recipe.weight_spec("params/Dense_0/kernel").short()
    'int4/g32'
    >>> recipe.match("params/Dense_1/kernel").act.short()
    'int8/ch'
    >>> recipe.match("params/Dense_1/bias") is None     # stays float
    True
    >>> print(recipe)
    Recipe([
      Rule('.*Dense_0/kernel', weight=int4/g32, act=float),
      Rule('.*kernel', weight=int8/ch, act=int8/ch)
    ])
  """

  rules: tuple[Rule, ...]

  def __init__(self, rules: Iterable[Rule]):
    rules = tuple(rules)
    for rule in rules:
      if not isinstance(rule, Rule):
        raise ValueError(f"Recipe takes Rule objects, got {rule!r}")
    object.__setattr__(self, "rules", rules)

  def match(self, path: str) -> Rule | None:
    """The first rule whose pattern fully matches `path`, or None."""
    index = self._first(path)
    return None if index is None else self.rules[index]

  def _first(self, path: str) -> int | None:
    """Index of the first rule matching `path`, or None."""
    return next((i for i, r in enumerate(self.rules) if r.matches(path)),
                None)

  def without_methods(self) -> "Recipe":
    """The same rules with every weight rounded to nearest (no `method`)."""
    return Recipe(dataclasses.replace(r, method=None) for r in self.rules)

  def weight_spec(self, path: str) -> QuantSpec | None:
    """The weight spec of `path`'s rule; None to keep it float."""
    rule = self.match(path)
    return None if rule is None else rule.weight

  def check_used(self, quantizable: Sequence[str], all_paths: Sequence[str],
                 what: str = "parameter") -> None:
    """Raises ValueError for a non-optional rule that decides no path.

    A rule with a weight spec must be the first match of some path in
    `quantizable`, a keep-float rule of some path in `all_paths`. A rule
    whose paths all go to earlier rules is reported as shadowed by them.
    """
    for index, rule in enumerate(self.rules):
      if rule.optional:
        continue
      pool, kind = ((quantizable, what) if rule.weight is not None
                    else (all_paths, "parameter"))
      matched = [p for p in pool if rule.matches(p)]
      owners = sorted({self._first(p) for p in matched})
      if not matched:
        raise ValueError(_no_match(rule, pool, all_paths, kind))
      if index not in owners:
        raise ValueError(_shadowed(self.rules, index, owners, matched, kind))

  def __str__(self):
    rows = [f"  Rule({r.pattern!r}, weight={_label(r.weight)}, "
            f"act={_label(r.act)}"
            + (f", method={r.method.name}" if r.method else "") + ")"
            for r in self.rules]
    return "Recipe([\n" + ",\n".join(rows) + "\n])"


def _no_match(rule: Rule, pool, all_paths, what: str) -> str:
  others = [p for p in all_paths if rule.matches(p)]
  note = (f" (it matches only paths that are not a {what}: "
          f"{', '.join(others[:3])})" if others else "")
  listing = "\n  ".join(pool) or "(none)"
  return (f"Rule {rule.pattern!r} matches no {what}{note}. Fix the pattern "
          f"or mark it Rule(..., optional=True). Available paths:\n  "
          f"{listing}")


def _shadowed(rules, index: int, owners, matched, what: str) -> str:
  earlier = " and ".join(f"rule {i} ({rules[i].pattern!r})" for i in owners)
  paths = ", ".join(matched[:3]) + (", ..." if len(matched) > 3 else "")
  return (f"Rule {index} ({rules[index].pattern!r}) is shadowed by "
          f"{earlier}: the first matching rule wins, and every {what} it "
          f"matches ({paths}) goes to the earlier rule. Move it before "
          f"{earlier}, narrow the earlier pattern, or drop it.")


def _label(spec: QuantSpec | None) -> str:
  return "float" if spec is None else spec.short()
