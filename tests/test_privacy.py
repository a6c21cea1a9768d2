"""Privacy: DICOM patient metadata never reaches the stream, logs, recordings, metrics or feedback data.

A DICOM written with pydicom carries PatientName, PatientID, PatientBirthDate, OtherPatientIDs, InstitutionName and
ReferringPhysicianName (stream/faults.PATIENT) and the name burned into the pixels' margin. It is served by a real
``sonomaly serve`` (log level debug), watched by an aiortc viewer, recorded and fed back; every response, the data
channel, the log and every file written are searched for the patient strings.
"""
from __future__ import annotations

import logging
import time

import pytest

from sonomaly.stream import faults as F


@pytest.fixture(scope="module")
def privacy_result(tmp_path_factory):
    return F.scenario_privacy(F.Context(tmp_path_factory.mktemp("privacy")))


def test_no_patient_string_reaches_any_output(privacy_result):
    r = privacy_result
    assert r.error is None, r.error
    assert r.checks["a recording and a feedback frame were made (the checks looked at real files)"], r.metrics
    for place in ("/health", "/api/records", "data channel metadata", "server log (debug)"):
        assert place in r.metrics["places_checked"]
    assert any(p.startswith("file rec") for p in r.metrics["places_checked"])
    assert any(p.startswith("file fb") for p in r.metrics["places_checked"])
    assert r.checks["no patient string anywhere"], r.metrics["leaks"]


def test_feedback_frames_hide_burned_in_text(privacy_result):
    assert privacy_result.checks["feedback frames de-identified (burned-in name blacked out)"], \
        privacy_result.metrics["burned_in_text_contrast_per_saved_file"]


def test_recordings_hide_burned_in_text(privacy_result):
    assert privacy_result.checks["recordings de-identified (burned-in name blacked out)"], \
        privacy_result.metrics["burned_in_text_contrast_per_saved_file"]


def test_pipeline_frames_records_and_logs_in_process(tmp_path, caplog):
    """In process, at DEBUG: frame metadata, /health stats, timing records and every log line."""
    from sonomaly.stream.pipeline import Pipeline
    from sonomaly.stream.sources import ReconnectingSource, open_source

    caplog.set_level(logging.DEBUG)
    path = F.privacy_dicom(tmp_path / "cine.dcm", n=8)
    src = ReconnectingSource(lambda: open_source(path, loop=True))
    p = Pipeline(src, None)
    seen = []
    p.start()
    try:
        deadline = time.monotonic() + 5
        seq = 0
        while time.monotonic() < deadline and len(seen) < 10:
            seq, out = p.out.slot.get_newer(seq, timeout=0.5, take=False)
            if out is not None:
                seen.append(repr(out.meta))
        stats = p.stats()
    finally:
        p.stop()
    assert len(seen) >= 10
    text = " ".join(seen) + repr(stats) + repr(list(p.records)) + caplog.text
    assert not F.find_patient_data(text)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("breakage", ["truncated", "no pixel data", "undecodable compressed data"])
def test_errors_about_a_patient_file_name_no_patient(tmp_path, caplog, breakage):
    """Failures are reported (SourceError, /health last_error, logs) without any patient attribute."""
    from sonomaly.stream.sources import ReconnectingSource, SourceError, open_source

    caplog.set_level(logging.DEBUG)
    ds = F.dicom_dataset(F.clip_frames(2, (32, 48)))
    if breakage == "no pixel data":
        del ds.PixelData
    if breakage == "undecodable compressed data":
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEGBaseline8Bit

        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([b"\xff\xd8 not a jpeg"] * 2)
    path = F.save_dicom(ds, tmp_path / "broken.dcm")
    if breakage == "truncated":
        data = (tmp_path / "broken.dcm").read_bytes()
        (tmp_path / "broken.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError) as ei:
        with open_source(path, realtime=False) as s:
            list(s)
    rs = ReconnectingSource(lambda: open_source(path), backoff_initial=0.05, backoff_max=0.05,
                            placeholder_interval=0.01)
    rs.open()
    frame = rs.read()
    rs.close()
    assert frame is not None and not frame.signal
    text = str(ei.value) + repr(rs.last_error) + repr(frame.meta) + caplog.text
    assert "broken.dcm" in text  # the failure is reported...
    assert not F.find_patient_data(text)  # ...without patient data


def test_deidentify_removes_text_burned_over_the_image_but_keeps_the_heatmap(demo_clip):
    """Annotations inside the scan region (not only in the margins) are blacked out; the heatmap colours stay."""
    import cv2
    import numpy as np

    from sonomaly import overlay
    from sonomaly.stream.privacy import deidentify
    from sonomaly.stream.roi import detect_scan_region

    cap = cv2.VideoCapture(str(demo_clip))
    ok, raw = cap.read()
    cap.release()
    assert ok
    region = detect_scan_region(raw)
    x, y, w, h = region.bbox
    org = (x + w // 4, y + h // 2)
    raw_marked = raw.copy()
    cv2.putText(raw_marked, "DOE^JANE 1971", org, cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    strokes = np.zeros(raw.shape[:2], np.uint8)
    cv2.putText(strokes, "DOE^JANE 1971", org, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)
    strokes = strokes > 127
    assert (region.mask[strokes] > 0).all(), "the test text must lie inside the scan region"

    amap = np.zeros(raw.shape[:2], np.float32)
    amap[y + h // 5: y + h // 3, x + w // 3: x + 2 * w // 3] = 1.5
    composed = overlay.compose(raw_marked, amap, region, score=None, style=overlay.OverlayStyle())

    clean = deidentify(composed, region, raw_marked)
    g = clean.max(axis=2).astype(np.float32)
    assert g[strokes].max() == 0, "every stroke of the burned-in text is blacked out"
    heat = (amap > 0) & (region.mask > 0)
    kept = (clean[heat] == composed[heat]).all(axis=1).mean()
    assert kept > 0.9, f"the heatmap survives de-identification ({kept:.2%} kept)"
    assert (clean[region.mask == 0] == 0).all()
    # and it does not eat the image: on the unmarked frame almost all of the scan survives
    plain = deidentify(raw, region)
    inside = region.mask > 0
    assert (plain[inside] == raw[inside]).all(axis=1).mean() > 0.95
