"""`--key=value` options, the one override parser of every script (train.py, predict.py, ...); a bare
`--flag` sets a bool to true.

Each script keeps its settings in dataclasses with commented defaults; `parse` turns the command
line into typed overrides of their fields and refuses anything else before work starts.
"""
from dataclasses import fields

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse(argv, *settings, positional=()):
    """argv -> one dict of typed overrides per dataclass in `settings` (a key goes to the first
    that has the field); arguments without "--" fill the fields named in `positional`, in order.
    Raises SystemExit naming the argument for an unknown key, a bad value or a missing argument."""
    owner = {}
    for i, kind in enumerate(settings):
        for f in fields(kind):
            owner.setdefault(f.name, (i, f.type))
    out = [{} for _ in settings]
    plain = [a for a in argv if not a.startswith("--")]
    if len(plain) != len(positional):
        raise SystemExit(f"expected {len(positional)} argument(s) ({' '.join(positional).upper() or 'none'}) besides "
                         f"--key=value options, got {len(plain)}: {' '.join(plain)}")
    for name, value in zip(positional, plain):
        i, kind = owner[name]
        out[i][name] = typed(name, value, kind)
    for arg in (a for a in argv if a.startswith("--")):
        key, _, value = arg[2:].partition("=")
        if key not in owner:
            raise SystemExit(f"unknown option {arg!r}; options are --key=value with key one of {', '.join(sorted(owner))}")
        i, kind = owner[key]
        if "=" not in arg and kind is not bool:
            raise SystemExit(f"--{key} needs a value: --{key}=...")
        out[i][key] = True if "=" not in arg else typed(key, value, kind)  # a bare --flag is --flag=true
    return out


def typed(key, value, kind):
    if kind is bool:
        if value.lower() not in TRUE + FALSE:
            raise SystemExit(f"--{key}={value}: expected true or false")
        return value.lower() in TRUE
    try:
        return kind(value)
    except ValueError:
        raise SystemExit(f"--{key}={value}: expected {kind.__name__}") from None
