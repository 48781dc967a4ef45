"""What a strict load_state_dict refused, as one line a user can act on: the teachers' weights (precompute) and an
exported student loaded back through timm (train.student.load_export) share it."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadProblem:
    """torch's strict load_state_dict refusal, as key lists: missing (in the model, not in the weights), unexpected
    (in the weights, not in the model), and shape mismatches (key, weights' shape, model's shape)."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, str, str]]

    @classmethod
    def of(cls, err: Exception) -> "LoadProblem | None":
        text = str(err)
        if "Error(s) in loading state_dict" not in text:
            return None

        def keys(kind: str) -> list[str]:
            found = re.search(re.escape(kind) + r' in state_dict: ((?:"[^"]*"(?:, )?)+)', text)
            return re.findall(r'"([^"]*)"', found.group(1)) if found else []
        shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
        return cls(keys("Missing key(s)"), keys("Unexpected key(s)"), shapes)

    def describe(self, optional: set[str] = frozenset()) -> str:
        """The problems, leaving out the missing keys in `optional` (a head the teacher drops)."""
        parts = []
        missing = [k for k in self.missing if k not in optional]
        if missing:
            parts.append(f"missing from the weights: {summarise_keys(missing)}")
        if self.unexpected:
            parts.append(f"in the weights but not in the model: {summarise_keys(self.unexpected)}")
        if self.mismatched:
            key, theirs, ours = self.mismatched[0]
            more = f" (and {len(self.mismatched) - 1} more)" if len(self.mismatched) > 1 else ""
            parts.append(f"other shapes: {key} is {theirs} in the weights, {ours} in the model{more}")
        return "; ".join(parts)


def summarise_keys(keys: list[str]) -> str:
    """Tensor names as a short list: a numbered container as one range ("blocks.6-11: 72 tensors", with the names in
    it when they are few: "blocks.0-11: 24 tensors (ls1.gamma, ls2.gamma)"), other names as they are."""
    groups: dict[str, tuple[set[int], list[str]]] = {}
    plain = []
    for key in keys:
        found = re.match(r"^(.*?)\.(\d+)\.(.+)$", key)
        if found is None:
            plain.append(key)
            continue
        numbers, rest = groups.setdefault(found.group(1), (set(), []))
        numbers.add(int(found.group(2)))
        rest.append(found.group(3))
    parts = []
    for prefix, (numbers, rest) in groups.items():
        names = sorted(set(rest))
        inside = f" ({', '.join(names)})" if len(names) <= 3 else ""
        parts.append(f"{prefix}.{_ranges(sorted(numbers))}: {len(rest)} tensors{inside}")
    shown = plain[:8] + ([f"... ({len(plain) - 8} more)"] if len(plain) > 8 else [])
    return "; ".join(parts + ([", ".join(shown)] if shown else []))


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
