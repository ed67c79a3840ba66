import cv2
import numpy as np
import pytest

from screening.imaging import DecodeLimits, decode, decode_bytes, preprocess, reduction_factor
from screening.rejection import Rejection, RejectReason
from training.data.synthetic import make_fundus
from training.data.transforms import preprocess_fundus


def test_reduction_factor_keeps_enough_pixels():
    assert reduction_factor(4288, 2848, 512) == 4  # 712 px short side >= 1.25 * 512
    assert reduction_factor(1024, 685, 512) == 1
    assert reduction_factor(4288, 2848, 256) == 8


def test_decode_matches_training_preprocessing(tmp_path):
    img = make_fundus(np.random.default_rng(0), size=300).image
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    d = decode(path, 128, display_size=256)
    assert d.rgb.shape == (128, 128, 3) and d.display.shape == (256, 256, 3)
    assert np.array_equal(d.rgb, preprocess_fundus(img, 128)[0])
    assert d.original_size == (300, 300) and d.decode_factor == 1


def test_big_camera_jpeg_uses_reduced_decode(shared_data):
    d = decode(shared_data / "fullres" / "camera_01.jpg", 256)
    assert d.decode_factor == 4 and d.original_size == (4288, 2848)


def test_decode_keeps_the_whole_frame_for_the_intake_checks(tmp_path):
    img = make_fundus(np.random.default_rng(1), size=300).image
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.pad(img, ((0, 0), (50, 50), (0, 0))), cv2.COLOR_RGB2BGR))
    d = decode(path, 128)
    assert d.whole is not None and d.whole.shape == (300, 400, 3)  # uncropped: field geometry is measured on it


def test_dark_and_odd_pictures_are_decoded_not_judged(tmp_path):
    """Whether a picture is a gradable fundus photo is the learned verdict's call (screening.checks), not decode's."""
    path = tmp_path / "dark.png"
    cv2.imwrite(str(path), np.zeros((300, 300, 3), np.uint8))
    assert decode(path, 64).rgb.shape == (64, 64, 3)


def test_tiny_and_corrupt_files(tmp_path):
    small = tmp_path / "s.png"
    cv2.imwrite(str(small), np.zeros((50, 50, 3), np.uint8))
    with pytest.raises(Rejection, match="too small") as exc:
        decode(small, 64)
    assert exc.value.code == RejectReason.TOO_SMALL
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(Rejection) as exc:
        decode(bad, 64)
    assert exc.value.code == RejectReason.INCOMPLETE and "incomplete or corrupt" in exc.value.message
    junk = tmp_path / "j.jpg"
    junk.write_bytes(b"no image signature at all")
    with pytest.raises(Rejection) as exc:
        decode(junk, 64)
    assert exc.value.code == RejectReason.UNREADABLE


# ------------------------------------------------------------------------- complete files, hard limits (issue 12)

def _fundus_bytes(ext: str, size: int = 400, seed: int = 0) -> bytes:
    img = make_fundus(np.random.default_rng(seed), size=size).image
    ok, enc = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return enc.tobytes()


@pytest.mark.parametrize("cut", [
    lambda d: d[: len(d) * 3 // 10],  # the first 30%: the decoder used to fill the rest with grey
    lambda d: d[: len(d) * 3 // 10] + b"\xff\xd9",  # ... even with an end marker put back
    lambda d: d[:2000] + bytes(len(d) - 2000),  # full length, but the second part not written yet (zeros)
    lambda d: d[:3000] + b"\x55" * 400 + d[3400:],  # corrupt entropy-coded data
], ids=["truncated", "truncated-with-eoi", "preallocated", "corrupt"])
def test_an_incomplete_jpeg_is_refused_not_graded(cut):
    data = _fundus_bytes(".jpg")
    assert decode_bytes(data, 64).rgb.shape == (64, 64, 3)  # the whole file is fine
    with pytest.raises(Rejection) as exc:
        decode_bytes(cut(data), 64)
    assert exc.value.code == RejectReason.INCOMPLETE and "incomplete or corrupt" in exc.value.message


@pytest.mark.parametrize("ext, cut", [
    (".png", lambda d: d[:-12]),  # no IEND
    (".png", lambda d: d[:60] + bytes([d[60] ^ 0xFF]) + d[61:]),  # a chunk fails its CRC
    (".png", lambda d: d[: len(d) // 2]),
    (".bmp", lambda d: d[: len(d) // 2]),
    (".tif", lambda d: d[: len(d) - 200]),
])
def test_incomplete_png_bmp_tiff_are_refused(ext, cut):
    data = _fundus_bytes(ext)
    assert decode_bytes(data, 64).original_size == (400, 400)
    with pytest.raises(Rejection) as exc:
        decode_bytes(cut(data), 64)
    assert exc.value.code == RejectReason.INCOMPLETE


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims ``width`` x ``height`` pixels (its data would be gigabytes decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header is edited to claim ``width`` x ``height``."""
    data = bytearray(_fundus_bytes(".jpg", size=200))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("data", [_png_header_only(30000, 30000), _png_header_only(13000, 13000), _jpeg_claiming(20000, 15000)],
                         ids=["png-30000", "png-13000", "jpeg-20000x15000"])
def test_decompression_bombs_are_refused_from_the_header(data):
    """Refused from the header alone: quick, and without the gigabytes a decode would take (a 13000 px square
    PNG used to raise the worker's peak memory to 2.4 GB)."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(Rejection) as exc:
        decode_bytes(data, 64, limits=DecodeLimits(max_pixels=50_000_000))
    assert exc.value.code == RejectReason.TOO_LARGE and "max_pixels" in exc.value.message
    assert time.perf_counter() - t0 < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: under 100 MB more


def _tiff(pages: list[tuple[tuple[int, int], int]]) -> bytes:
    """A TIFF with one page per (size, NewSubfileType) entry, each a fundus picture of that size."""
    import io

    from PIL import Image, TiffImagePlugin

    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf) as tf:
        for (w, h), subfile in pages:
            img = cv2.resize(make_fundus(np.random.default_rng(0), size=300).image, (w, h))
            Image.fromarray(img).save(tf, "TIFF", tiffinfo={254: subfile})
            tf.newFrame()
    return buf.getvalue()


def test_multi_page_tiff_one_photo_or_a_refusal():
    thumb_first = _tiff([((80, 80), 1), ((300, 300), 0)])  # a thumbnail, then the photo: the photo is read
    assert decode_bytes(thumb_first, 64).original_size == (300, 300)
    with pytest.raises(Rejection) as exc:  # two photos in one file: refused, not graded as its first page
        decode_bytes(_tiff([((300, 300), 0), ((300, 300), 0)]), 64)
    assert exc.value.code == RejectReason.MULTI_PAGE and "2 full-size pictures" in exc.value.message
    with pytest.raises(Rejection) as exc:
        decode_bytes(_tiff([((200, 200), 0)] + [((60, 60), 1)] * 5), 64, limits=DecodeLimits(max_pages=4))
    assert exc.value.code == RejectReason.MULTI_PAGE and "more than 4 pages" in exc.value.message


def _tiff_of(pictures: list[np.ndarray], subfiles: list[int] | None = None) -> bytes:
    """A TIFF with one page per RGB picture (NewSubfileType from ``subfiles``, default 0: full size)."""
    import io

    from PIL import Image, TiffImagePlugin

    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf) as tf:
        for rgb, subfile in zip(pictures, subfiles or [0] * len(pictures)):
            Image.fromarray(rgb).save(tf, "TIFF", tiffinfo={254: subfile})
            tf.newFrame()
    return buf.getvalue()


def test_a_multi_page_tiff_is_read_page_by_page():
    """Issue 12: every full-size page is read, one at a time; the first page used to be graded alone, silently,
    and then the whole file was refused. Whether a page is a gradable fundus photo is the intake checks' call on
    each page (screening.stages.pages), as for a single photo: decoding judges only what cannot be a photo."""
    from screening.imaging import decode_pages, several_pictures

    rng = np.random.default_rng
    a, b = make_fundus(rng(1), size=300).image, make_fundus(rng(2), size=240).image
    white, small = np.full((200, 200, 3), 255, np.uint8), make_fundus(rng(4), size=100).image
    data = _tiff_of([cv2.resize(a, (60, 60)), a, white, small, b], subfiles=[1, 0, 0, 0, 0])  # a thumbnail first
    limits = DecodeLimits(max_pages=5)  # the default (4) would refuse the file: thumbnails count as pages
    assert several_pictures(data, limits) and not several_pictures(_tiff_of([a]), limits)
    assert not several_pictures(data, DecodeLimits(max_pages=4))  # over the limit: decode_bytes says why
    assert not several_pictures(cv2.imencode(".jpg", a)[1].tobytes(), limits)
    assert not several_pictures(data[:300], limits)  # a damaged header: decode_bytes says why
    pages = list(decode_pages(data, 64, limits=limits, name="P1_R.tif"))
    assert [(p.number, p.size) for p in pages] == [(2, (300, 300)), (3, (200, 200)), (4, (100, 100)), (5, (240, 240))]
    assert pages[2].decoded is None and pages[2].rejection.code == RejectReason.TOO_SMALL
    assert pages[1].rejection is None and pages[1].decoded.whole.shape == (200, 200, 3)  # not judged here
    for page, rgb in ((pages[0], a), (pages[3], b)):
        assert page.rejection is None and np.array_equal(page.decoded.rgb, preprocess(rgb, page.size, 64).rgb)
        assert np.array_equal(page.decoded.whole, rgb)  # the whole page, for the intake checks
    with pytest.raises(Rejection) as exc:  # the file itself cut short: refused (or deferred) as a whole
        list(decode_pages(data[: len(data) - 5000], 64, limits=limits, name="P1_R.tif"))
    assert exc.value.code == RejectReason.INCOMPLETE and "page 5" in exc.value.message
    with pytest.raises(Rejection) as exc:  # the limits are checked on the headers, before any page is decoded
        next(decode_pages(data, 64, limits=DecodeLimits(max_pixels=240 * 240, max_pages=5), name="P1_R.tif"))
    assert exc.value.code == RejectReason.TOO_LARGE


def test_a_page_is_turned_upright_as_viewers_show_it():
    import io

    from PIL import Image

    from screening.imaging import decode_pages

    a = make_fundus(np.random.default_rng(3), size=300).image[:, 50:250].copy()  # 200 wide, 300 high
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "TIFF", save_all=True, append_images=[Image.fromarray(a)], tiffinfo={274: 6})
    pages = list(decode_pages(buf.getvalue(), 64))
    assert [p.size for p in pages] == [(300, 200), (300, 200)]  # orientation 6: turned a quarter clockwise
    upright = np.ascontiguousarray(np.rot90(a, k=-1))
    assert np.array_equal(pages[0].decoded.rgb, preprocess(upright, (300, 200), 64).rgb)


def test_an_empty_file_has_its_own_reason():
    with pytest.raises(Rejection) as exc:
        decode_bytes(b"", 64)
    assert exc.value.code == RejectReason.EMPTY


def test_real_photos_pass_the_complete_file_check_and_cut_ones_do_not(shared_data):
    """The strict check must not refuse real exports (all 5181 JPEGs in ../shared/data pass; a sample here),
    and a real camera file cut short is refused."""
    from screening.imaging import jpeg_complete

    files = sorted(p for p in shared_data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    assert files
    for path in files[:: max(1, len(files) // 120)]:
        assert jpeg_complete(path.read_bytes()) is None, path.name
    camera = (shared_data / "fullres" / "camera_01.jpg").read_bytes()
    for cut in (camera[: len(camera) // 3], camera[: len(camera) - 5000] + b"\xff\xd9"):
        with pytest.raises(Rejection) as exc:
            decode_bytes(cut, 256)
        assert exc.value.code == RejectReason.INCOMPLETE
# ------------------------------------------------------------------------------ masks on the original photo


def _photo_with_spot(width=2400, height=1600, centre=(1300, 800), radius=900, spot=(1650, 520), spot_radius=14):
    """A wide camera photo whose round field is cut at the top and bottom (so the crop is narrower than the photo
    and the square is padded above and below), with one bright yellow-white spot at a known place."""
    img = np.zeros((height, width, 3), np.uint8)
    cv2.circle(img, centre, radius, (170, 80, 35), -1)  # RGB: a red-orange fundus
    cv2.circle(img, spot, spot_radius, (255, 255, 200), -1)
    return img


def _spot_mask(decoded):
    """What a lesion head would draw for the spot: the bright pixels of the model frame, as (1, S, S)."""
    return (decoded.rgb.min(axis=2) > 150)[None]


def test_geometry_records_the_reduced_decode_crop_and_padding(tmp_path):
    path = tmp_path / "wide.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(_photo_with_spot(), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    d = decode(path, 256, display_size=512)
    g = d.geometry
    assert d.decode_factor == 2 and g.original_size == (2400, 1600) and g.decoded_size == (1200, 800)
    x0, y0, x1, y1 = g.crop
    assert (y0, y1) == (0, 800) and abs(x0 - 200) <= 4 and abs(x1 - 1100) <= 4  # the field, at half size
    assert g.pad == (0, (g.side - 800) // 2) and g.pad[1] > 0 and g.side == x1 - x0


def test_a_bright_spot_maps_back_to_its_place_on_the_original_photo(tmp_path):
    """The round trip the masks make: photo -> model frame (reduced decode, crop, pad, resize) -> original size."""
    spot = (1650, 520)
    path = tmp_path / "wide.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(_photo_with_spot(spot=spot), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    d = decode(path, 256)
    frame = _spot_mask(d)
    assert 0 < frame.sum() < 50  # a few model pixels
    (mask,) = d.geometry.to_original(frame)
    assert mask.shape == (1600, 2400) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    assert mask[spot[1], spot[0]] == 255
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - spot[0]) < 4 and abs(ys.mean() - spot[1]) < 4  # centred on the spot, within a pixel or two
    assert xs.max() - xs.min() < 60 and ys.max() - ys.min() < 60  # and nowhere else


def test_masks_outside_the_crop_stay_empty_and_all_masks_map_at_once():
    img = _photo_with_spot()
    from screening.imaging import preprocess

    d = preprocess(img, (2400, 1600), 128, 128)
    full = np.ones((5, 128, 128), bool)  # a mask covering the whole frame, padding included
    maps = d.geometry.to_original(full)
    assert len(maps) == 5 and all(m.shape == (1600, 2400) for m in maps)
    x0, _, x1, _ = d.geometry.crop
    assert maps[0][:, : x0 - 1].max() == 0 and maps[0][:, x1 + 1:].max() == 0  # the black sides the crop cut off
    assert maps[4][:, x0 + 1: x1 - 1].min() == 255
    with pytest.raises(ValueError, match="square"):
        d.geometry.to_original(np.ones((1, 10, 12), bool))


def test_an_exif_rotated_photo_gets_masks_the_way_viewers_show_it(tmp_path):
    from PIL import Image

    upright = _photo_with_spot(width=1600, height=1200, centre=(800, 600), radius=580, spot=(1000, 300))
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # the camera stored it turned; EXIF 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    d = decode(path, 128, display_size=128)
    assert d.original_size == (1600, 1200)
    (mask,) = d.geometry.to_original(_spot_mask(d))
    assert mask.shape == (1200, 1600) and mask[300, 1000] == 255
