"""DICOM cine decoding: every frame of a (multi-frame) DICOM file as ``H x W x 3`` ``uint8`` BGR.

:func:`read_dicom` opens and validates a file and returns a :class:`DicomClip`; ``clip.frame_bgr(i)`` decodes frame
``i``. Supported: MONOCHROME1 (inverted) / MONOCHROME2, RGB, YBR_FULL / YBR_FULL_422, PALETTE COLOR (8- or 16-bit LUT
entries, segmented LUTs), 8 and 16 bits allocated (12/16 bits stored), PlanarConfiguration 0/1, native and RLE
transfer syntaxes, plus JPEG / JPEG 2000 encapsulated data through pydicom's decoder plugins or, when none is
installed, OpenCV's decoders.

Grey levels of >8-bit data are mapped to 8 bits once per file (never per frame, so brightness does not flicker): by
(0028,1050) WindowCenter / (0028,1051) WindowWidth when present, else by a robust (0.5 .. 99.5 %) percentile range
taken from a sample of frames. 8-bit grey data is shown as stored.

Privacy: nothing here reads patient attributes; :meth:`DicomClip.meta` exposes only technical fields, and error
messages name the file path and the technical problem only.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import cv2
import numpy as np

from sonomaly.stream.sources import SourceError

log = logging.getLogger(__name__)

DEFAULT_FPS = 10.0

#: Photometric interpretations this module turns into BGR.
SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")

# Encapsulated syntaxes OpenCV can decode frame by frame when pydicom has no plugin (JPEG baseline/extended/lossless,
# JPEG 2000). JPEG-LS and others need pylibjpeg / gdcm.
_CV2_FALLBACK_SYNTAXES = {
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
}


def _first(value: Any) -> Any:
    """First item of a multi-valued element (WindowCenter may hold several windows)."""
    if value is None:
        return None
    try:
        if isinstance(value, (str, bytes)):
            return value
        return value[0]
    except (TypeError, IndexError):
        return value


def _float_or_none(value: Any) -> float | None:
    try:
        v = float(_first(value))
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def dicom_fps(ds: Any) -> float | None:
    """Frame rate from FrameTime (ms/frame), CineRate, RecommendedDisplayFrameRate or FrameTimeVector, else None."""
    ft = _float_or_none(ds.get("FrameTime"))
    if ft is not None and ft > 0:
        return 1000.0 / ft
    for key in ("CineRate", "RecommendedDisplayFrameRate"):
        v = _float_or_none(ds.get(key))
        if v is not None and v > 0:
            return v
    ftv = ds.get("FrameTimeVector")
    if ftv is not None:
        try:
            vals = [float(x) for x in list(ftv)[1:]]  # first entry is 0 by definition
            vals = [v for v in vals if v > 0 and math.isfinite(v)]
            if vals:
                return 1000.0 / (sum(vals) / len(vals))
        except (TypeError, ValueError):
            pass
    return None


def to_bgr_u8(image: np.ndarray) -> np.ndarray:
    """Any decoder output (grey, grey+alpha, BGR, BGRA, 16-bit, float) -> contiguous ``H x W x 3`` uint8 BGR."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        elif np.issubdtype(img.dtype, np.floating):
            mx = float(np.nanmax(img)) if img.size else 1.0
            scale = 255.0 if mx <= 1.0 else 1.0
            img = np.clip(np.nan_to_num(img) * scale, 0, 255).astype(np.uint8)
        else:
            img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3:
        raise ValueError(f"unexpected image shape {img.shape}")
    if img.shape[2] == 2:  # grey + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGRA2BGR)
    if img.shape[2] == 3:
        return np.ascontiguousarray(img)
    raise ValueError(f"unexpected number of channels {img.shape[2]}")


class DicomClip:
    """A validated DICOM file whose frames can be decoded one at a time (see :func:`read_dicom`)."""

    def __init__(self, path: str, ds: Any):
        self.path = path
        self._ds = ds
        self.rows = int(ds.Rows)
        self.cols = int(ds.Columns)
        self.photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        self.samples = int(ds.get("SamplesPerPixel", 1) or 1)
        self.bits_allocated = int(ds.BitsAllocated)
        self.bits_stored = int(ds.get("BitsStored", self.bits_allocated) or self.bits_allocated)
        self.modality = str(ds.get("Modality", "") or "")
        try:
            self.n_frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            self.n_frames = 1
        fps = dicom_fps(ds)
        self.fps_from_file = fps is not None
        self.fps = fps if fps is not None and fps < 1000 else DEFAULT_FPS
        self.transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        self._encapsulated: list[bytes] | None = None  # frames for the OpenCV fallback
        self._grey_lut: np.ndarray | None = None
        self._grey_map: tuple[float, float] | None = None  # (lo, hi) -> 0..255, computed once per file
        self._lut_shift16 = False

    # ---- public ---------------------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """Technical, patient-free metadata."""
        return {
            "modality": self.modality,
            "rows": self.rows,
            "cols": self.cols,
            "frames": self.n_frames,
            "fps": self.fps,
            "photometric": self.photometric,
        }

    def frame_bgr(self, index: int) -> np.ndarray:
        """Frame ``index`` as ``rows x cols x 3`` uint8 BGR; :class:`SourceError` when it cannot be decoded."""
        if not 0 <= index < self.n_frames:
            raise IndexError(f"frame {index} out of range (0..{self.n_frames - 1})")
        try:
            if self._encapsulated is not None:
                return self._cv2_frame(index)
            arr = self._raw_frame(index)
            return self._to_bgr(arr)
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a clear SourceError
            raise SourceError(
                f"DICOM {self.path}: cannot decode frame {index} ({self.photometric}, {self.bits_allocated}-bit, "
                f"transfer syntax {self._ts_name()}): {type(exc).__name__}: {exc}"
            ) from exc

    # ---- decoding -------------------------------------------------------------------------------------------------
    def _ts_name(self) -> str:
        from pydicom.uid import UID

        uid = UID(self.transfer_syntax)
        return f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)

    def _raw_frame(self, index: int) -> np.ndarray:
        from pydicom.pixels import pixel_array

        # raw=False: pydicom converts YBR_FULL / YBR_FULL_422 to RGB and removes 4:2:2 subsampling.
        return pixel_array(self._ds, index=index, raw=False)

    def _cv2_frame(self, index: int) -> np.ndarray:
        assert self._encapsulated is not None
        buf = np.frombuffer(self._encapsulated[index], np.uint8)
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
        if img is None:
            raise SourceError(
                f"DICOM {self.path}: OpenCV cannot decode frame {index} (transfer syntax {self._ts_name()}); "
                "install pylibjpeg or python-gdcm for this compression"
            )
        if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
            grey = img if img.ndim == 2 else img[:, :, 0]
            if grey.dtype == np.uint8 and self.bits_stored <= 8:
                out = grey
            else:
                out = self._map_grey(grey.astype(np.float32, copy=False), None)
            if self.photometric == "MONOCHROME1":
                out = 255 - out
            return cv2.cvtColor(np.ascontiguousarray(out), cv2.COLOR_GRAY2BGR)
        return to_bgr_u8(img)  # OpenCV already converted YCbCr JPEG data to BGR

    def _to_bgr(self, arr: np.ndarray) -> np.ndarray:
        pi = self.photometric
        if pi == "PALETTE COLOR":
            return self._palette(arr)
        if pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise SourceError(f"DICOM {self.path}: {pi} data decoded to shape {arr.shape}, "
                                  "expected rows x cols x 3")
            if arr.dtype != np.uint8:
                shift = max(0, self.bits_stored - 8)
                arr = np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
            return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)
        if pi in ("MONOCHROME1", "MONOCHROME2"):
            if arr.ndim == 3:  # defensive: some writers set SamplesPerPixel=3 with MONOCHROME
                arr = arr[:, :, 0]
            if arr.dtype == np.uint8 and self.bits_stored >= 8:
                out = arr
            else:
                out = self._map_grey(arr, self._ds)
            if pi == "MONOCHROME1":
                out = 255 - out
            return cv2.cvtColor(np.ascontiguousarray(out), cv2.COLOR_GRAY2BGR)
        raise SourceError(f"DICOM {self.path}: unsupported photometric interpretation {pi!r}")

    def _palette(self, arr: np.ndarray) -> np.ndarray:
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, self._ds)
        if rgb.ndim == 3 and rgb.shape[2] == 4:  # alpha LUT present
            rgb = rgb[:, :, :3]
        if rgb.dtype != np.uint8:
            if self._lut_shift16:
                rgb = ((rgb.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # exact for c * 257
            else:  # 16-bit descriptor but 8-bit values (a common writer quirk)
                rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)

    def _map_grey(self, arr: np.ndarray, ds: Any) -> np.ndarray:
        """>8-bit (or <8-bit) grey -> uint8 with a mapping fixed for the whole file."""
        x = arr.astype(np.float32, copy=False)
        slope = _float_or_none(self._ds.get("RescaleSlope"))
        intercept = _float_or_none(self._ds.get("RescaleIntercept"))
        if slope is not None and slope != 0 and ds is not None:
            x = x * slope
        if intercept is not None and ds is not None:
            x = x + intercept
        if self._grey_map is None:
            self._grey_map = self._compute_grey_map(x)
        lo, hi = self._grey_map
        y = (x - lo) * (255.0 / (hi - lo))
        return np.clip(np.rint(y), 0, 255).astype(np.uint8)

    def _compute_grey_map(self, first: np.ndarray) -> tuple[float, float]:
        wc = _float_or_none(self._ds.get("WindowCenter"))
        ww = _float_or_none(self._ds.get("WindowWidth"))
        if wc is not None and ww is not None and ww >= 1:
            # DICOM PS3.3 C.11.2.1.2.1 linear window: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] -> [0, 255]
            lo = wc - 0.5 - (ww - 1) / 2.0
            hi = wc - 0.5 + (ww - 1) / 2.0
            if hi > lo:
                return lo, hi
        # robust range from a few frames spread over the clip (not per frame: no flicker)
        samples = [first.ravel()]
        if self.n_frames > 1 and self._encapsulated is None:
            for i in sorted(set(np.linspace(0, self.n_frames - 1, num=min(8, self.n_frames)).astype(int)) - {0}):
                try:
                    samples.append(self._rescaled(self._raw_frame(int(i))).ravel())
                except Exception:  # noqa: BLE001 - a bad frame will raise again when it is read
                    break
        values = np.concatenate([s[:: max(1, s.size // 250_000)] for s in samples])
        lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        if not hi > lo:
            lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            hi = lo + 1.0
        return lo, hi

    def _rescaled(self, arr: np.ndarray) -> np.ndarray:
        x = arr.astype(np.float32)
        slope = _float_or_none(self._ds.get("RescaleSlope"))
        intercept = _float_or_none(self._ds.get("RescaleIntercept"))
        if slope is not None and slope != 0:
            x = x * slope
        if intercept is not None:
            x = x + intercept
        if x.ndim == 3:
            x = x[:, :, 0]
        return x


def _validate(path: str, ds: Any) -> DicomClip:
    from pydicom.uid import UID

    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if other:
            raise SourceError(f"DICOM {path}: {other[0]} (float pixel data) is not supported")
        raise SourceError(f"DICOM {path}: no image in the file (PixelData (7FE0,0010) is missing)")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if ds.get(k) in (None, "")]
    if missing:
        raise SourceError(f"DICOM {path}: required image attribute(s) missing: {', '.join(missing)}")
    if int(ds.Rows) <= 0 or int(ds.Columns) <= 0:
        raise SourceError(f"DICOM {path}: invalid image size {ds.Rows}x{ds.Columns}")
    bits = int(ds.BitsAllocated)
    if bits not in (1, 8, 16, 32):
        raise SourceError(f"DICOM {path}: unsupported BitsAllocated={bits}")
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if "PhotometricInterpretation" not in ds:
        ds.PhotometricInterpretation = "MONOCHROME2"
    encoded_ok = pi in SUPPORTED_PHOTOMETRIC or pi in ("YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
    if not encoded_ok:
        raise SourceError(
            f"DICOM {path}: unsupported photometric interpretation {pi!r} "
            f"(supported: {', '.join(SUPPORTED_PHOTOMETRIC)})"
        )
    if pi == "PALETTE COLOR" and not any(
        k in ds for k in ("RedPaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData")
    ):
        raise SourceError(f"DICOM {path}: PALETTE COLOR image without a palette colour lookup table")

    clip = DicomClip(path, ds)
    tsyntax = UID(clip.transfer_syntax)
    if not tsyntax.is_transfer_syntax:
        raise SourceError(f"DICOM {path}: unknown transfer syntax {tsyntax!s}")
    if tsyntax.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            if str(tsyntax) in _CV2_FALLBACK_SYNTAXES:
                from pydicom.encaps import generate_frames

                try:
                    clip._encapsulated = list(generate_frames(ds.PixelData, number_of_frames=clip.n_frames))
                except Exception as exc:  # noqa: BLE001
                    raise SourceError(f"DICOM {path}: broken encapsulated pixel data ({exc})") from exc
                if len(clip._encapsulated) < clip.n_frames:
                    raise SourceError(
                        f"DICOM {path}: encapsulated pixel data holds {len(clip._encapsulated)} frames, "
                        f"NumberOfFrames says {clip.n_frames}"
                    )
                log.info("DICOM %s: %s decoded with OpenCV (no pydicom plugin installed)", path, tsyntax.name)
            else:
                raise SourceError(
                    f"DICOM {path}: pixel data is compressed with {tsyntax.name} ({tsyntax}) and no decoder is "
                    "installed for it (install pylibjpeg with its plugins, or python-gdcm)"
                )
    else:
        from pydicom.pixels.utils import get_expected_length

        try:
            expected = int(get_expected_length(ds, "bytes"))
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"DICOM {path}: inconsistent image attributes ({exc})") from exc
        actual = len(ds.PixelData)
        if actual < expected:
            raise SourceError(
                f"DICOM {path}: wrong pixel data length: {actual} bytes, but {clip.n_frames} frame(s) of "
                f"{clip.rows}x{clip.cols}x{clip.samples} at {bits} bits need {expected} bytes (truncated or corrupt)"
            )
        if actual > expected + 1:
            log.warning("DICOM %s: pixel data has %d bytes more than expected; extra bytes ignored", path,
                        actual - expected)

    if pi == "PALETTE COLOR":
        clip._lut_shift16 = _palette_is_16bit(ds)
    return clip


def _palette_is_16bit(ds: Any) -> bool:
    """True when palette entries really span 16 bits (descriptor says 16 and values exceed 255)."""
    desc = ds.get("RedPaletteColorLookupTableDescriptor")
    try:
        entry_bits = int(desc[2])
    except (TypeError, IndexError, ValueError):
        entry_bits = 16
    if entry_bits != 16:
        return False
    mx = 0
    for colour in ("Red", "Green", "Blue"):
        data = ds.get(f"{colour}PaletteColorLookupTableData")
        if data is None:
            data = ds.get(f"Segmented{colour}PaletteColorLookupTableData")
        if data is None:
            continue
        raw = data.value if hasattr(data, "value") else data
        if isinstance(raw, (bytes, bytearray)):
            vals = np.frombuffer(bytes(raw)[: len(raw) // 2 * 2], "<u2")
            mx = max(mx, int(vals.max()) if vals.size else 0)
        else:
            mx = 65535
    return mx > 255


def read_dicom(path: str | os.PathLike[str]) -> DicomClip:
    """Open and validate a DICOM file; every problem is a :class:`SourceError` with a clear message."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SourceError(f"DICOM {path}: file not found")
    if os.path.isdir(path):
        raise SourceError(f"DICOM {path}: is a directory, not a DICOM file")
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)  # files without the 128-byte preamble / DICM prefix
            if "PixelData" not in ds and "Rows" not in ds:
                raise SourceError(f"DICOM {path}: not a DICOM file (no DICM header and no image attributes)") from None
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on garbage input
        raise SourceError(f"DICOM {path}: cannot parse file ({type(exc).__name__}: {exc})") from exc

    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        fm = getattr(ds, "file_meta", None) or FileMetaDataset()
        implicit = getattr(ds, "is_implicit_VR", True)
        fm.TransferSyntaxUID = ImplicitVRLittleEndian if implicit in (True, None) else ExplicitVRLittleEndian
        ds.file_meta = fm
    try:
        return _validate(path, ds)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"DICOM {path}: invalid image attributes ({type(exc).__name__}: {exc})") from exc
