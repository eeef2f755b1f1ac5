import time
def test_probe(recorded_session):
    s = recorded_session
    for sid in s.series:
        v = s.of(sid, "volume")
        e = s.of(sid, "series.end")[0]
        print(sid, len(v), e["summary"]["tsnr"], e["site_percentiles"], v[-1]["site_percentiles"])
    print([ (m.header["code"], m.header["message"]) for m in s.messages if m.topic=="alert"])
