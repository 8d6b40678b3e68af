"""Models by name: ``register_model(name, factory)``, ``create_model(name, num_classes)``.

A config names its model (``config.model.name``); the run, the command line,
saved runs and every analysis build it with ``create_model``, so a model a
user registers is rebuilt by name everywhere, exactly as the shipped ones
(which register themselves the same way when ``swamp_jax.models`` is
imported). A factory is ``factory(num_classes, **options) -> Module``: a
``flax.linen.Module`` or a ``flax.nnx.Module`` whose ``__call__(x, train)``
returns logits [batch, num_classes].

Registrations live in the process: a module that registers a model must be
imported before a run, or an analysis of a saved run, asks for it by name
(a config file that imports it does this for the command line).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

from swamp_jax.models import lifting

_FACTORIES: dict[str, Callable] = {}
# Families named by a pattern (e.g. 'wrn{depth}_{width}'): (regex, description, match -> factory).
_FAMILIES: list[tuple[re.Pattern, str, Callable]] = []
_SHIPPED: set[str] = set()
# ``run(model=...)`` records its model under a name starting with this: no factory can
# rebuild it, and ``get_factory`` says so.
PASSED_MODEL_PREFIX = "<passed to run(model=...)>"
# The config's model fields passed to factories that take an argument of that name.
CONFIG_FIELDS = ("conv_impl", "bn_momentum")


def register_model(name: str, factory: Callable) -> None:
  """Makes ``factory`` the model called ``name`` (``config.model.name``).

  Args:
    name: a non-empty string; a shipped model's name cannot be taken. Registering
      a name again replaces the earlier factory (re-running a notebook cell).
    factory: ``factory(num_classes, **options) -> Module``. ``options`` are
      ``config.model.options``, plus ``conv_impl`` and ``bn_momentum`` from
      ``config.model`` where the factory has arguments of those names. A factory
      taking ``rngs`` (an NNX module's constructor) is called with ``nnx.Rngs`` of
      the run's init key, so the seed sets the initialization.

  Example:
    >>> swamp_jax.register_model("my_mlp", lambda num_classes, width=64: MyMLP(width, num_classes))
    >>> config.model.name = "my_mlp"; config.model.options.width = 128

  Raises:
    ValueError: the name is empty or a shipped model's. TypeError: not callable.
  """
  if not isinstance(name, str) or not name or name.startswith("<"):
    raise ValueError(f"a model name must be a non-empty string not starting with '<', got {name!r}")
  if not callable(factory):
    raise TypeError(f"the factory of model {name!r} must be callable, got {factory!r}")
  if name in _SHIPPED or any(regex.fullmatch(name) for regex, _, _ in _FAMILIES):
    raise ValueError(f"{name!r} is a shipped model's name; register yours under another")
  _FACTORIES[name] = factory


def register_model_family(pattern: str, description: str, create_factory: Callable) -> None:
  """Shipped families named by a regex (``create_factory(match) -> factory``)."""
  _FAMILIES.append((re.compile(pattern), description, create_factory))


def registered_model_names() -> tuple[str, ...]:
  """Every name ``create_model`` takes, families by their description."""
  return (*_FACTORIES, *(description for _, description, _ in _FAMILIES))


def get_factory(name: str) -> Callable:
  """The factory registered as ``name``.

  Raises:
    ValueError: ``name`` is not registered (the registered names are listed), or
      names a model that was passed to ``run(model=...)`` (how to rebuild it).
  """
  if isinstance(name, str) and name.startswith(PASSED_MODEL_PREFIX):
    raise ValueError(
      f"this run trained a model passed as an object ({name}), which cannot be rebuilt "
      "from its config: to analyse or resume it by name, register its factory with "
      "swamp_jax.register_model('my_model', factory), set config.model.name='my_model', "
      "and run that config"
    )
  if name in _FACTORIES:
    return _FACTORIES[name]
  for regex, _, create_factory in _FAMILIES:
    match = regex.fullmatch(name) if isinstance(name, str) else None
    if match:
      return create_factory(match)
  raise ValueError(
    f"unknown model {name!r}; registered: {', '.join(registered_model_names())}. "
    "A model of your own: swamp_jax.register_model(name, factory) in a module that is "
    "imported first (e.g. by the config file)"
  )


def create_model(name: str, num_classes: int, *args, **options):
  """The model ``name`` for ``num_classes`` classes: ``get_factory(name)(num_classes, ...)``.

  The shipped models take ``conv_impl`` ('auto', 'xla' or 'im2col', resolved with
  ``convolution.resolve_conv_impl``) and ``bn_momentum``, also positionally:
  ``create_model('resnet20', 10, 'im2col')``.

  Raises:
    ValueError: an unknown name (the registered ones are listed), or options the
      factory does not take (its signature is shown).
  """
  factory = get_factory(name)
  signature = _signature(factory)
  # An NNX factory: called with ``rngs`` of the run's init key when the run initializes.
  takes_rngs = signature is not None and "rngs" in signature.parameters and "rngs" not in options
  if signature is not None:
    try:
      signature.bind(num_classes, *args, **options, **({"rngs": None} if takes_rngs else {}))
    except TypeError as e:
      raise ValueError(
        f"model {name!r} does not take these options {options or args} ({e}); its factory "
        f"is {name}{signature} (set options in config.model.options)"
      ) from e
  if takes_rngs:
    return lifting.create_nnx_model(factory, num_classes, *args, **options)
  return lifting.as_functional(factory(num_classes, *args, **options))


def _signature(factory: Callable) -> inspect.Signature | None:
  """The arguments ``factory(...)`` takes; for a class, its ``__init__``'s (an nnx.Module's
  metaclass ``__call__`` would show only ``*args, **kwargs``)."""
  try:
    if isinstance(factory, type):
      signature = inspect.signature(factory.__init__)
      return signature.replace(parameters=list(signature.parameters.values())[1:])
    return inspect.signature(factory)
  except (TypeError, ValueError):  # some builtins and C callables have none
    return None


def accepts_argument(factory: Callable, name: str) -> bool:
  """Whether ``factory`` takes a keyword argument ``name`` (or any, via ``**kwargs``)."""
  signature = _signature(factory)
  if signature is None:
    return False
  parameters = signature.parameters.values()
  return any(
    p.kind == p.VAR_KEYWORD
    or (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    for p in parameters
  )


def _as_hashable(value):
  # Models are static arguments of jitted programs: options read back from config.json
  # arrive as lists and dicts, which a linen dataclass field cannot hash.
  if isinstance(value, list | tuple):
    return tuple(_as_hashable(v) for v in value)
  if isinstance(value, dict):
    return tuple((k, _as_hashable(v)) for k, v in sorted(value.items()))
  return value


def create_configured_model(model_config, num_classes: int):
  """``config.model`` as a module: its name, ``options``, and the fields in
  ``CONFIG_FIELDS`` that the factory takes by name."""
  factory = get_factory(model_config.name)
  options = {f: model_config[f] for f in CONFIG_FIELDS if accepts_argument(factory, f)}
  user = model_config.options
  user = user.to_dict() if hasattr(user, "to_dict") else dict(user)
  options.update({k: _as_hashable(v) for k, v in user.items()})
  return create_model(model_config.name, num_classes, **options)


def end_shipped_registrations() -> None:
  """Called once the shipped families are imported: their names cannot be taken."""
  _SHIPPED.update(_FACTORIES)
