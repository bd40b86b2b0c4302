"""Decoding: every supported format, EXIF orientation, colour modes, limits and corrupt input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from yolonas_serving.decode import DecodeLimits, decode_image
from yolonas_serving.errors import RequestError


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=2))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_exactly(fmt):
    original = gradient()
    options = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(original, fmt, **options))
    np.testing.assert_array_equal(decoded.pixels, np.asarray(original))
    assert decoded.original_size == (64, 48)


def test_jpeg_decodes_to_rgb():
    decoded = decode_image(encode(gradient(), "JPEG", quality=95))
    assert decoded.pixels.shape == (48, 64, 3) and decoded.pixels.dtype == np.uint8
    assert np.abs(decoded.pixels.astype(int) - np.asarray(gradient()).astype(int)).mean() < 3


def test_gif_first_frame():
    frames = [Image.new("P", (20, 10), color) for color in (1, 2)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    pixels = decode_image(buffer.getvalue()).pixels
    assert pixels.shape == (10, 20, 3) and tuple(pixels[0, 0]) == (255, 0, 0)


#  Six colours far apart, in 2 rows x 3 columns of blocks: no flip or rotation maps this picture onto itself.
BLOCK_COLOURS = np.array(
    [[(230, 30, 30), (30, 200, 30), (30, 30, 230)], [(240, 230, 20), (230, 30, 230), (20, 220, 230)]], dtype=np.uint8
)
#  How to store the upright picture so that a viewer honouring EXIF orientation N shows it upright. The tag says where
#  the stored row 0 and column 0 belong when displayed (EXIF 2.32, 4.6.4 A): 2 column 0 on the right (mirrored),
#  3 upside down, 4 row 0 at the bottom (flipped), 5 row 0 on the left and column 0 at the top (transposed), 6 row 0
#  on the right (the viewer turns it 90 degrees clockwise), 7 row 0 on the right and column 0 at the bottom
#  (transverse), 8 row 0 on the left (the viewer turns it counter-clockwise).
STORED_AS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, -1),
}


def blocks(block: int) -> np.ndarray:
    """The upright picture: 2 x 3 blocks of ``block`` pixels, wider than high."""
    return BLOCK_COLOURS.repeat(block, axis=0).repeat(block, axis=1)


def with_orientation(upright: np.ndarray, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(STORED_AS[orientation](upright))
    return encode(Image.fromarray(stored), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", STORED_AS)
def test_every_exif_orientation_decodes_upright_in_a_lossless_format(orientation: int):
    upright = blocks(8)
    decoded = decode_image(with_orientation(upright, orientation, "PNG"))
    np.testing.assert_array_equal(decoded.pixels, upright)
    assert decoded.original_size == (24, 16)


@pytest.mark.parametrize("orientation", STORED_AS)
def test_every_exif_orientation_decodes_upright_from_a_reduced_size_jpeg(orientation: int):
    """A camera's JPEG, decoded at half size (the pipeline's draft decoding): each block's colour where it belongs,
    and the full upright size reported."""
    decoded = decode_image(with_orientation(blocks(64), orientation, "JPEG"), min_longest_side=96)
    assert decoded.pixels.shape == (64, 96, 3) and decoded.original_size == (192, 128)
    block_means = decoded.pixels.reshape(2, 32, 3, 32, 3)[:, 4:-4, :, 4:-4].mean(axis=(1, 3))
    np.testing.assert_allclose(block_means, BLOCK_COLOURS, atol=12)


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, as super-gradients does
        (Image.new("LA", (4, 4), (50, 200)), (50, 50, 50)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
    ],
)
def test_colour_modes_become_rgb(image, expected):
    fmt = "TIFF" if image.mode == "CMYK" else "PNG"
    pixels = decode_image(encode(image, fmt)).pixels
    assert pixels.shape == (4, 4, 3) and tuple(pixels[0, 0]) == expected


def test_palette_png_becomes_rgb():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert tuple(decode_image(encode(image, "PNG")).pixels[1, 1]) == (12, 34, 56)


def test_sixteen_bit_grey_keeps_its_range():
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    pixels = decode_image(encode(Image.fromarray(wide), "PNG")).pixels
    assert pixels[0, :, 0].tolist() == [0, 100, 255]


def test_large_jpeg_decodes_at_reduced_size_but_reports_full_size():
    data = encode(gradient(2000, 1600), "JPEG", quality=90)
    drafted = decode_image(data, min_longest_side=400)
    assert drafted.pixels.shape == (400, 500, 3)  # 1/4 keeps the longest side >= 400, 1/8 would not
    assert drafted.original_size == (2000, 1600)
    assert decode_image(data, min_longest_side=1000).pixels.shape == (800, 1000, 3)
    assert decode_image(data, min_longest_side=1001).pixels.shape == (1600, 2000, 3)  # 1/2 would go below
    assert decode_image(encode(gradient(2000, 1600), "PNG"), min_longest_side=400).pixels.shape == (1600, 2000, 3)
    # A 720p frame halves for the COCO pipeline (longest side to 636), whatever its short side.
    assert decode_image(encode(gradient(1280, 720), "JPEG"), min_longest_side=636).pixels.shape == (360, 640, 3)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty image"),
        (b"%PDF-1.4\n%...", "not an image"),
        (b"PK\x03\x04" + b"\x00" * 40, "not an image"),
        (b"hello world", "not an image"),
    ],
)
def test_non_images_are_refused(data, message):
    with pytest.raises(RequestError, match=message) as info:
        decode_image(data)
    assert info.value.status == 400


def test_truncated_images_are_refused():
    for fmt in ("PNG", "JPEG"):
        data = encode(gradient(256, 256), fmt)
        with pytest.raises(RequestError, match="corrupt image data|unreadable"):
            decode_image(data[: len(data) // 2])


def test_limits():
    data = encode(gradient(100, 100), "PNG")
    with pytest.raises(RequestError, match="limit is 100") as too_big:
        decode_image(data, DecodeLimits(max_bytes=100))
    assert too_big.value.status == 413
    with pytest.raises(RequestError, match="10000 pixels; the limit is 9999"):
        decode_image(data, DecodeLimits(max_pixels=9999))


def test_decompression_bomb_is_refused_before_decoding():
    """A 20000x20000 PNG compresses to a few hundred KB; its header alone must get it refused."""
    bomb = encode(Image.new("L", (20000, 20000)), "PNG", optimize=True)
    assert len(bomb) < 1_000_000
    # PIL's own bomb check is a process-wide setting that sahi (imported by the slicing tests) turns off; the
    # pixel limit read from the header refuses it either way.
    with pytest.raises(RequestError, match=r"decompression bomb|= 400000000 pixels; the limit is 40000000") as info:
        decode_image(bomb)
    assert info.value.status == 413
