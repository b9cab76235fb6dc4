"""The quantization formats MLX stores (mx.quantize's modes), written once for the kernels, the config parser, the
KV caches and convert: mode -> (bits, group sizes). affine stores a scale and a bias per group; the microscaling
formats store one shared exponent (mx) or fp8 scale (nv) per group and have one fixed shape."""

QUANT_FORMATS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}


def quant_format_problem(mode: object, bits: object, group_size: object) -> str | None:
    """What MLX can store instead of (mode, bits, group_size), or None when it can store that."""
    if mode not in QUANT_FORMATS:
        return f"mode {mode!r} is not one of {', '.join(QUANT_FORMATS)}"
    all_bits, groups = QUANT_FORMATS[mode]
    if bits not in all_bits or group_size not in groups:
        return (f"{mode} takes bits {'/'.join(map(str, all_bits))} and group size "
                f"{'/'.join(map(str, groups))}")
    return None
