"""The summary ``dnq export`` prints from a sidecar.

Example:
    >>> side = {"source": {"arch": "cnn-digits", "run": "runs/d"}, "onnx": "d.onnx", "opset": 21,
    ...         "ptq": {"method": "rtn", "bits": "W4A4", "convention": "dnq", "range": "minmax"},
    ...         "layers": [{"layer": "0", "bits": 8, "container": "INT8"},
    ...                    {"layer": "3", "bits": 4, "container": "INT4"}],
    ...         "activations": [{"bits": 8}, {"bits": 4}],
    ...         "size": {"onnx_bytes": 4000, "float_onnx_bytes": 60000, "ratio": 4000 / 60000},
    ...         "accuracy": {"test_acc": 98.06, "n": 360}}
    >>> print(format_export(side, "d.onnx"))  # doctest: +NORMALIZE_WHITESPACE
    exported cnn-digits (runs/d), rtn W4A4, dnq convention, minmax ranges, to d.onnx (opset 21)
      weights: 1 layer at 8 bits (INT8), 1 at 4 bits (INT4); activations: 1 quantizer at 8 bits, 1 at 4 bits
      size: 3.9 KiB, float model 58.6 KiB (0.067x)
      test accuracy (fake-quantized, 360 images): 98.06%
    wrote d.onnx and d.onnx.json
"""

from __future__ import annotations

from collections import Counter


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _counts(items: list[dict], key: str, noun: str) -> str:
    """``"2 layers at 8 bits (INT8), 19 at 4 bits (INT4)"``: widest first, float last."""
    c = Counter((it.get("bits"), it.get(key)) for it in items)
    parts = []
    for bits, cont in sorted(c, key=lambda k: (-(k[0] or 99), str(k[1]))):
        n = c[(bits, cont)]
        head = f"{n} {noun}{'s' if n > 1 else ''}" if not parts else f"{n}"
        parts.append(f"{head} at {'float' if bits is None else f'{bits} bits'}{f' ({cont})' if cont else ''}")
    return ", ".join(parts)


def _check_lines(check: dict) -> list[str]:
    e = check["exported"]
    lines = [f"  round trip in onnxruntime {e['onnxruntime']} (CPU) on the test split ({e['n']} images):",
             f"    as exported:          accuracy {e['acc_onnx']:.2f}% (ours {e['acc_ours']:.2f}%, difference "
             f"{e['acc_diff']:+.2f} points), argmax agreement {e['agreement']:.2%}, logits max |diff| "
             f"{e['max_abs_diff']:.2g}  -> {'passed' if check['passed'] else 'FAILED'}"]
    d = check["onnxruntime_default"]
    if "error" in d:
        lines.append(f"    onnxruntime defaults: cannot load the model ({d['error'][:160]})")
    else:
        lines.append(f"    onnxruntime defaults (float biases quantized to int32): accuracy {d['acc_onnx']:.2f}%, "
                     f"argmax agreement {d['agreement']:.2%}")
    return lines


def format_export(side: dict, out) -> str:
    """The command's summary of an export (its sidecar)."""
    p, s = side["ptq"], side["size"]
    lines = [f"exported {side['source'].get('arch')} ({side['source']['run']}), {p['method']} {p['bits']}, "
             f"{p['convention']} convention, {p['range']} ranges, to {out} (opset {side['opset']})",
             f"  weights: {_counts(side['layers'], 'container', 'layer')}; activations: "
             f"{_counts(side['activations'], '', 'quantizer')}",
             f"  size: {_kib(s['onnx_bytes'])}, float model {_kib(s['float_onnx_bytes'])} ({s['ratio']:.3f}x)"
             + "".join(f"; {b}-bit weights {e['ratio_to_float32']:.3f}x float32 ({e['container']})"
                       for b, e in sorted(s.get("weights_by_bits", {}).items(), key=lambda kv: -int(kv[0]))),
             f"  test accuracy (fake-quantized, {side['accuracy']['n']} images): {side['accuracy']['test_acc']:.2f}%"]
    if "check" in side:
        lines += _check_lines(side["check"])
    lines.append(f"wrote {out} and {out}.json")
    return "\n".join(lines)


__all__ = ["format_export"]
