"""What a search varies: --space items and space files read into a space, its grid, and
Optuna's distributions.

    space = parse_space(["lr=0.01,0.05", "hidden_size=256,512x256", "reg=1e-5:1e-2:log"])

A space maps training options (config.py's keys) to {"choices": [...]} or to a range
{"low", "high", "log", "int"}. hidden_size choices are strings "AxB" (Optuna's categorical
values must be scalars).
"""
import itertools
import json
import math

import optuna

import cli
import config as cfg
import files
import limits

# How a value is read, by the type of the option's default: (reader, what it should be).
READ = {
    bool: (lambda text: BOOLS[text.lower()], "true or false"),
    list: (lambda text: "x".join(map(str, hidden_sizes(text))), "a size such as 512 or 512x256"),
    int: (int, "int"), float: (float, "float"), str: (str, "str"),
}
BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# The types a range may search, and its bounds' type (a hidden-size range sizes both layers).
BOUNDS = {int: int, float: float, list: int}


def parse_space(items):
    """The search space of `key=v1,v2,...` (choices) and `key=lo:hi[:log]` (range) items."""
    space = {}
    for item in items:
        name, sep, text = item.partition("=")
        key = name.strip().replace("-", "_")
        key = cfg.ALIASES.get(key, key)
        if not sep or not text.strip():
            raise cli.Error(f"--space takes KEY=VALUES items such as lr=0.01,0.05; got {item!r}")
        if key not in cfg.DEFAULT_CONFIG or key in cfg.LOCAL_KEYS:
            keys = ", ".join(k for k in cfg.DEFAULT_CONFIG if k not in cfg.LOCAL_KEYS)
            raise cli.Error(f"cannot search {name!r}: not a training option; choose from {keys}")
        if key in space:
            raise cli.Error(f"--space names {key} twice")
        space[key] = parse_param(key, text)
    return space


def load_space_file(path):
    """The search space in a JSON file, read as --space items: {"lr": [0.01, 0.05], "reg":
    {"low": 1e-4, "high": 1e-2, "log": true}, "hidden_size": [256, [512, 256]]}."""
    try:
        with files.open_regular(path, limits.SPACE_FILE_BYTES) as f:  # not a FIFO: it would hang
            spec = json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise cli.Error(f"cannot read --space-file {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:
        why = ("is not UTF-8 text" if isinstance(exc, UnicodeDecodeError)
               else "is nested too deeply" if isinstance(exc, RecursionError)
               else f"is not valid JSON: {exc}")
        raise cli.Error(f"--space-file {path} {why}") from None
    if not isinstance(spec, dict):
        raise cli.Error(f"--space-file {path} must hold a JSON object of key: values")
    items = []
    for name, value in spec.items():
        if not isinstance(value, dict):
            values = [("x".join(map(str, v)) if isinstance(v, list) else  # hidden sizes
                       str(v).lower() if isinstance(v, bool) else str(v))
                      for v in (value if isinstance(value, list) else [value])]
            items.append(f"{name}={','.join(values)}")
        elif set(value) <= {"low", "high", "log"} and {"low", "high"} <= set(value):
            log = ":log" if value.get("log") else ""
            items.append(f"{name}={value['low']}:{value['high']}{log}")
        else:
            raise cli.Error(f"--space-file {path}: {name} must be a list of values or "
                            '{"low": .., "high": .., "log": true|false}')
    return parse_space(items)


def parse_param(key, text):
    """One parameter: a list of choices, or a `lo:hi[:log]` range, typed like the default."""
    kind, parts = type(cfg.DEFAULT_CONFIG[key]), [p.strip() for p in text.split(":")]
    if len(parts) == 1:
        read, expected = READ[kind]
        values = []
        for value in (v.strip() for v in text.split(",")):
            try:
                values.append(read(value))
            except (KeyError, ValueError):
                raise cli.Error(f"--space {key}: cannot read {value!r} as {expected}") from None
        if len(set(values)) < len(values):
            raise cli.Error(f"--space {key} repeats a value: {text}")
        return {"choices": values}
    log = parts[-1].lower() == "log"
    parts = parts[:-1] if log else parts
    if len(parts) != 2 or kind not in BOUNDS:
        raise cli.Error(f"--space {key}={text}: a range is lo:hi or lo:hi:log, and only for "
                        "numbers")
    try:
        low, high = map(BOUNDS[kind], parts)
    except ValueError:
        raise cli.Error(f"--space {key}={text}: bounds must be "
                        f"{'integers' if BOUNDS[kind] is int else 'numbers'}") from None
    if not low < high or (log and low <= 0):
        raise cli.Error(f"--space {key}={text}: need lo < hi" + (" and lo > 0 for log" if log
                                                                  else ""))
    return {"low": low, "high": high, "log": log, "int": BOUNDS[kind] is int}


def hidden_sizes(value):
    """Both hidden sizes, from 512 (for both), "512" or "512x256"."""
    sizes = [int(h) for h in str(value).lower().split("x")]
    if len(sizes) not in (1, 2):
        raise ValueError(f"not one or two sizes: {value}")
    return sizes * (3 - len(sizes))


def config_values(params):
    """Trial parameters as config overrides (hidden sizes back to a list of two ints)."""
    if "hidden_size" not in params:
        return dict(params)
    return {**params, "hidden_size": hidden_sizes(params["hidden_size"])}


def grid_size(space):
    """How many combinations a space of choices holds, counted without making them."""
    return math.prod(len(p["choices"]) for p in space.values())


def grid(space):
    """Every combination of a space of choices, in the order given."""
    return [dict(zip(space, values))
            for values in itertools.product(*(p["choices"] for p in space.values()))]


def distributions(space):
    """The space as Optuna's distributions (a queued trial gets its queued values)."""
    dist = optuna.distributions
    return {key: dist.CategoricalDistribution(p["choices"]) if "choices" in p else
            (dist.IntDistribution if p["int"] else dist.FloatDistribution)(
                p["low"], p["high"], log=p["log"]) for key, p in space.items()}
