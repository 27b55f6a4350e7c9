"""Layers: which tensors belong to an architecture's layer stack, and the output tensors
a recipe's slices make of them (docs/recipes.md "Slices").

The layer stack is found from tensor names alone, so any architecture works:

- A tensor is a layer tensor when a dotted component after the first is a plain
  decimal integer (`model.layers.12.mlp.up_proj.weight`: prefix `model.layers`, index
  12, rest `mlp.up_proj.weight`); the first such component counts, so experts or
  sub-blocks numbered further in stay inside their layer.
- Tensors are grouped by prefix. A candidate stack is a prefix whose indices are exactly
  0..N-1. When config.json (or a nested config such as `text_config`) declares a layer
  count (num_hidden_layers, n_layer, num_layers, n_layers), only candidates of that
  size count. Of the rest the one with the most tensors wins; a tie is ambiguous (no
  stack).
- Tensors outside the stack are "pre" (embeddings: a name containing embed, wte, wpe)
  or "post" (everything else: final norm, lm_head), which picks the first or the last
  slice's models and parameters for them.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
PRE_MARKERS = ("embed", "wte", "wpe")


@dataclass(frozen=True)
class LayerStack:
    prefix: str  # e.g. "model.layers"
    count: int

    def name(self, index: int, rest: str) -> str:
        return f"{self.prefix}.{index}.{rest}"


def split_layer(name: str) -> tuple[str, int, str] | None:
    """(prefix, index, rest) of a name with a numbered component after the first, else None."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        c = parts[i]
        if c.isdigit() and c.isascii() and (c == "0" or not c.startswith("0")):
            return ".".join(parts[:i]), int(c), ".".join(parts[i + 1:])
    return None


def declared_counts(config: dict | None) -> set[int]:
    """Layer counts config.json declares, at the top level or one level down."""
    out: set[int] = set()
    for scope in [config or {}] + [v for v in (config or {}).values() if isinstance(v, dict)]:
        for key in LAYER_KEYS:
            if type(scope.get(key)) is int:
                out.add(scope[key])
    return out


def find_stack(names, config: dict | None = None) -> tuple[LayerStack | None, str]:
    """The layer stack of a model with these tensor names, or None and why not."""
    groups: dict[str, tuple[set, list]] = {}
    for name in names:
        hit = split_layer(name)
        if hit:
            indices, members = groups.setdefault(hit[0], (set(), []))
            indices.add(hit[1])
            members.append(name)
    candidates = [(p, len(ix), len(m)) for p, (ix, m) in groups.items() if ix == set(range(len(ix)))]
    if not candidates:
        return None, "no tensor name has a layer number (such as model.layers.0.)"
    declared = declared_counts(config)
    sized = [c for c in candidates if c[1] in declared]
    if declared and not sized:
        return None, (f"config.json declares {', '.join(map(str, sorted(declared)))} layer(s), but the numbered "
                      f"tensors give " + ", ".join(f"{p}.0-{n - 1}" for p, n, _ in candidates))
    pool = sized or candidates
    best = max(c[2] for c in pool)
    top = [c for c in pool if c[2] == best]
    if len(top) > 1:
        return None, "ambiguous layer stacks: " + ", ".join(f"{p} ({n} layers)" for p, n, _ in top)
    return LayerStack(top[0][0], top[0][1]), ""


def is_pre(name: str) -> bool:
    """A tensor before the layers (embeddings), as opposed to after them (norm, head)."""
    return any(marker in name for marker in PRE_MARKERS)


def layer_t(j: int, length: int) -> float:
    """Gradient position of offset j in a slice of `length` layers (docs/recipes.md)."""
    return 1.0 if length == 1 else j / (length - 1)


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor: its name, output layer (None outside the stack), gradient
    position t, the slice whose models and parameters apply, and the input tensor name
    of each of that slice's sources (in source order)."""

    name: str
    layer: int | None
    t: float
    slice: int
    inputs: tuple[str, ...]


def whole_model(names, stack: LayerStack | None, n_sources: int) -> list[OutputSpec]:
    """`models:` recipes: every tensor from the same name in every model, t over the stack."""
    out = []
    for name in names:
        hit = split_layer(name) if stack else None
        if hit and hit[0] == stack.prefix:
            out.append(OutputSpec(name, hit[1], layer_t(hit[1], stack.count), 0, (name,) * n_sources))
        else:
            out.append(OutputSpec(name, None, 0.0, 0, (name,) * n_sources))
    return out


def sliced(names, stack: LayerStack, slices: list[tuple[int, list[int]]]) -> list[OutputSpec]:
    """`slices:` recipes. `slices`: per slice (length, first input layer of each source).
    Output layers are numbered consecutively; embeddings come from the first slice's
    sources, the other tensors outside the stack from the last slice's. Raises
    ValueError when two sources' layers hold different tensors."""
    rests: dict[int, list[str]] = {}
    pre, post = [], []
    for name in names:
        hit = split_layer(name)
        if hit and hit[0] == stack.prefix:
            rests.setdefault(hit[1], []).append(hit[2])
        else:
            (pre if is_pre(name) else post).append(name)
    n_first, n_last = len(slices[0][1]), len(slices[-1][1])
    out = [OutputSpec(name, None, 0.0, 0, (name,) * n_first) for name in pre]
    j = 0
    for k, (length, firsts) in enumerate(slices):
        for offset in range(length):
            layers = [a + offset for a in firsts]
            want = rests[layers[0]]
            for other in layers[1:]:
                if set(rests[other]) != set(want):
                    raise ValueError(f"layer {layers[0]} and layer {other} hold different tensors")
            t = layer_t(offset, length)
            for rest in want:
                out.append(OutputSpec(stack.name(j, rest), j, t, k, tuple(stack.name(a, rest) for a in layers)))
            j += 1
    out += [OutputSpec(name, None, 0.0, len(slices) - 1, (name,) * n_last) for name in post]
    return out
