"""DICOM decoding to BGR (all photometric interpretations we support), fps, error messages, privacy."""
from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless

from sonomaly.stream.dicom import dicom_fps, read_dicom
from sonomaly.stream.sources import DicomSource, SourceError, open_source

R, C, NF = 6, 8, 4
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-123456", "PatientBirthDate": "19700101",
           "StudyDate": "20240101"}
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


def base_ds(tsyntax=ExplicitVRLittleEndian, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.SOPClassUID = US_MULTIFRAME
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "US"
    for k, v in PATIENT.items():
        setattr(ds, k, v)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def save(ds: Dataset, path) -> str:
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def make(tmp_path, name, arr, photometric, bits_stored=8, **attrs) -> str:
    ds = base_ds(**attrs)
    ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
    return save(ds, tmp_path / name)


def raw_pixels(tmp_path, name, data: bytes, *, frames=NF, rows=R, cols=C, samples=1, bits=8, stored=None,
               photometric="MONOCHROME2", planar=None, tsyntax=ExplicitVRLittleEndian, **attrs) -> str:
    """A dataset whose pixel attributes and bytes are set by hand (for layouts set_pixel_data won't write)."""
    ds = base_ds(tsyntax, **attrs)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored or bits, (stored or bits) - 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = photometric
    if frames > 1:
        ds.NumberOfFrames = frames
    if planar is not None:
        ds.PlanarConfiguration = planar
    ds.PixelData = data
    return save(ds, tmp_path / name)


def frames_of(path, **kw):
    with open_source(path, realtime=False, **kw) as src:
        return src, list(src)


def gradient(frames=NF, rows=R, cols=C, step=7):
    return np.array([[[(f * 40 + r * cols + c) * step % 256 for c in range(cols)] for r in range(rows)]
                     for f in range(frames)], np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
def test_monochrome2_8bit_multiframe_exact(tmp_path):
    arr = gradient()
    path = make(tmp_path, "m2.dcm", arr, "MONOCHROME2", FrameTime="40")
    src, frames = frames_of(path)
    assert isinstance(src, DicomSource) and src.fps == pytest.approx(25.0)
    assert len(frames) == NF and [f.id for f in frames] == list(range(NF))
    for i, f in enumerate(frames):
        assert f.image.shape == (R, C, 3) and f.image.dtype == np.uint8
        for ch in range(3):
            np.testing.assert_array_equal(f.image[:, :, ch], arr[i])
    m = frames[1].meta
    assert m["kind"] == "dicom" and m["index"] == 1 and m["source"] == path and m["fps"] == pytest.approx(25)
    assert m["modality"] == "US" and m["rows"] == R and m["cols"] == C and m["frames"] == NF
    assert m["photometric"] == "MONOCHROME2"


def test_privacy_no_patient_data_in_meta_or_logs(tmp_path, caplog):
    path = make(tmp_path, "p.dcm", gradient(), "MONOCHROME2", CineRate="30")
    caplog.set_level(logging.DEBUG)
    _, frames = frames_of(path)
    text = repr([f.meta for f in frames]) + caplog.text + repr(read_dicom(path).meta())
    for value in PATIENT.values():
        assert value not in text and value.split("^")[0] not in text
    assert "Patient" not in text


def test_monochrome1_inverted(tmp_path):
    arr = gradient()
    path = make(tmp_path, "m1.dcm", arr, "MONOCHROME1")
    _, frames = frames_of(path)
    np.testing.assert_array_equal(frames[2].image[:, :, 0], 255 - arr[2])


def test_16bit_stored12_window(tmp_path):
    arr = (gradient().astype(np.uint16) * 16)  # 0..4080
    path = make(tmp_path, "w.dcm", arr, "MONOCHROME2", 12, WindowCenter="2048", WindowWidth="4096")
    _, frames = frames_of(path)
    for i, f in enumerate(frames):
        expected = np.clip(np.rint((arr[i] - (2048 - 0.5 - 4095 / 2)) * 255 / 4095), 0, 255)
        assert np.abs(f.image[:, :, 1].astype(int) - expected).max() <= 1


def test_16bit_no_window_mapping_fixed_per_file(tmp_path):
    rng = np.random.default_rng(3)
    arr = rng.integers(1000, 3000, (NF, 32, 32)).astype(np.uint16)
    arr[1] = arr[1] // 2 + 500  # a darker frame: must stay darker (no per-frame normalisation)
    path = make(tmp_path, "n.dcm", arr, "MONOCHROME2", 12)
    _, frames = frames_of(path)
    means = [f.image.mean() for f in frames]
    assert means[1] < means[0] - 50
    assert all(60 < m < 200 for m in (means[0], means[2], means[3]))
    lo, hi = frames[0].image.min(), frames[0].image.max()
    assert lo <= 5 and hi >= 250  # robust range spans the output


def test_monochrome_signed_16bit(tmp_path):
    arr = np.linspace(-1000, 1000, NF * R * C).reshape(NF, R, C).astype(np.int16)
    ds = base_ds()
    ds.set_pixel_data(arr, "MONOCHROME2", 16, generate_instance_uid=False)
    path = save(ds, tmp_path / "s.dcm")
    _, frames = frames_of(path)
    assert frames[0].image.mean() < frames[-1].image.mean()


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configs(tmp_path, planar):
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (NF, R, C, 3), dtype=np.uint8)
    data = rgb.transpose(0, 3, 1, 2).tobytes() if planar else rgb.tobytes()
    path = raw_pixels(tmp_path, "rgb.dcm", data, samples=3, photometric="RGB", planar=planar)
    _, frames = frames_of(path)
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.image, rgb[i][:, :, ::-1])  # BGR


def test_ybr_full(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(30, 220, (NF, R, C, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb.copy(), "RGB", "YBR_FULL")
    path = raw_pixels(tmp_path, "ybr.dcm", ybr.tobytes(), samples=3, photometric="YBR_FULL", planar=0)
    _, frames = frames_of(path)
    for i, f in enumerate(frames):
        assert np.abs(f.image.astype(int) - rgb[i][:, :, ::-1]).max() <= 3


def test_ybr_full_422(tmp_path):
    # uniform colour per horizontal pixel pair so 4:2:2 sub-sampling is lossless
    rng = np.random.default_rng(6)
    pairs = rng.integers(30, 220, (NF, R, C // 2, 3), dtype=np.uint8)
    rgb = np.repeat(pairs, 2, axis=2)
    ybr = convert_color_space(rgb.copy(), "RGB", "YBR_FULL").astype(np.uint8)
    y = ybr[..., 0].reshape(NF, R, C // 2, 2)
    cb = ybr[..., 1].reshape(NF, R, C // 2, 2)[..., 0]
    cr = ybr[..., 2].reshape(NF, R, C // 2, 2)[..., 0]
    packed = np.stack([y[..., 0], y[..., 1], cb, cr], axis=-1)  # Y1 Y2 Cb Cr
    path = raw_pixels(tmp_path, "422.dcm", packed.tobytes(), samples=3, photometric="YBR_FULL_422", planar=0)
    _, frames = frames_of(path)
    assert frames[0].meta["photometric"] == "YBR_FULL_422"
    for i, f in enumerate(frames):
        assert np.abs(f.image.astype(int) - rgb[i][:, :, ::-1]).max() <= 3


@pytest.mark.parametrize("lut_kind", ["16bit", "8bit-values-in-16"])
def test_palette_color(tmp_path, lut_kind):
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 256, (NF, R, C), dtype=np.uint8)
    lut8 = rng.integers(0, 256, (3, 256), dtype=np.uint16)
    lut = lut8 * 257 if lut_kind == "16bit" else lut8
    ds = base_ds()
    ds.set_pixel_data(idx, "PALETTE COLOR", 8, generate_instance_uid=False)
    for k, name in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{name}PaletteColorLookupTableData", lut[k].astype("<u2").tobytes())
    path = save(ds, tmp_path / "pal.dcm")
    _, frames = frames_of(path)
    for i, f in enumerate(frames):
        expected_rgb = np.stack([lut8[k][idx[i]] for k in range(3)], axis=-1)
        np.testing.assert_array_equal(f.image, expected_rgb[:, :, ::-1].astype(np.uint8))


@pytest.mark.parametrize("attrs,fps", [
    ({"FrameTime": "33.3333"}, 30.0), ({"CineRate": "15"}, 15.0), ({"RecommendedDisplayFrameRate": "20"}, 20.0),
    ({"FrameTimeVector": ["0", "50", "50", "50"]}, 20.0), ({}, 10.0),
])
def test_fps_sources(tmp_path, attrs, fps):
    path = make(tmp_path, "f.dcm", gradient(), "MONOCHROME2", **attrs)
    assert read_dicom(path).fps == pytest.approx(fps, rel=1e-3)
    assert dicom_fps(Dataset()) is None


@pytest.mark.timeout(10)
def test_paced_and_loop(tmp_path):
    path = make(tmp_path, "l.dcm", gradient(), "MONOCHROME2", FrameTime="20")  # 50 fps
    with open_source(path, loop=True) as src:
        frames = [src.read() for _ in range(10)]
    assert [f.meta["index"] for f in frames] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert [f.id for f in frames] == list(range(10))
    span = (frames[-1].t_capture_ns - frames[0].t_capture_ns) / 1e6
    assert 140 < span < 300, span  # 9 intervals of 20 ms
    assert open_source(f"{path}?fps=5").fps == 5
    with open_source(f"dicom:{path}?fps=5") as src:
        assert src.fps == 5


def test_single_frame_and_no_preamble(tmp_path):
    img = gradient(frames=1)[0]
    ds = base_ds(ImplicitVRLittleEndian)
    ds.set_pixel_data(img, "MONOCHROME2", 8, generate_instance_uid=False)
    path = str(tmp_path / "raw.dcm")
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)  # no preamble / file meta
    _, frames = frames_of(path)
    assert len(frames) == 1
    np.testing.assert_array_equal(frames[0].image[:, :, 2], img)


def test_dicom_detected_by_signature_without_extension(tmp_path):
    path = make(tmp_path, "IM0001", gradient(), "MONOCHROME2")
    assert isinstance(open_source(path), DicomSource)


def test_jpeg_baseline_without_pydicom_plugin_uses_opencv(tmp_path):
    rgb = np.zeros((NF, 16, 16, 3), np.uint8)
    for i in range(NF):
        rgb[i, :, :] = (40 * i + 20, 100, 200 - 30 * i)
    encoded = [cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for f in rgb]
    ds = base_ds(JPEGBaseline8Bit)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = 16, 16, 3, NF
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_FULL_422", 0
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "jpeg.dcm")
    _, frames = frames_of(path)
    assert len(frames) == NF
    for i, f in enumerate(frames):
        assert f.image.shape == (16, 16, 3)
        assert np.abs(f.image.astype(int) - rgb[i][:, :, ::-1]).max() <= 6


# ---------------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------------
def _open_error(path) -> str:
    t0 = time.monotonic()
    with pytest.raises(SourceError) as ei:
        open_source(path).open()
    assert time.monotonic() - t0 < 2
    msg = str(ei.value)
    assert str(path) in msg
    for value in PATIENT.values():
        assert value not in msg
    return msg


def test_missing_pixel_data(tmp_path):
    ds = base_ds(Rows=R, Columns=C, BitsAllocated=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2")
    msg = _open_error(save(ds, tmp_path / "nopix.dcm"))
    assert "PixelData" in msg and "missing" in msg


def test_wrong_pixel_data_length(tmp_path):
    path = raw_pixels(tmp_path, "short.dcm", bytes(NF * R * C - 10))
    msg = _open_error(path)
    assert "length" in msg and str(NF * R * C) in msg


def test_compressed_without_decoder(tmp_path):
    ds = base_ds(JPEGLSLossless, Rows=R, Columns=C, BitsAllocated=8, BitsStored=8, HighBit=7, SamplesPerPixel=1,
                 PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(20)])
    ds["PixelData"].VR = "OB"
    msg = _open_error(save(ds, tmp_path / "jls.dcm"))
    assert "JPEG-LS" in msg and "decoder" in msg


def test_unsupported_photometric(tmp_path):
    path = raw_pixels(tmp_path, "hsv.dcm", bytes(NF * R * C * 3), samples=3, photometric="HSV", planar=0)
    assert "photometric" in _open_error(path)


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, bytes(range(256)) * 4])
def test_not_dicom(tmp_path, content):
    p = tmp_path / "bad.dcm"
    p.write_bytes(content)
    _open_error(p)


def test_missing_file(tmp_path):
    assert "not found" in _open_error(tmp_path / "absent.dcm")
