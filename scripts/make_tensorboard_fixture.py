"""Write tests/fixtures/tensorboard/events.out.tfevents.fixture with TensorBoard's own writer.

The file is what `tests/logging.rs` (`reader_decodes_tensorboard_fixture`) expects our reader to
decode exactly. Needs only the `tensorboard` package (no TensorFlow, no torch):

    python3 -m venv /tmp/tbvenv && /tmp/tbvenv/bin/pip install tensorboard
    /tmp/tbvenv/bin/python scripts/make_tensorboard_fixture.py
"""

import glob
import os
import shutil
import sys
import tempfile

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tensorboard",
                   "events.out.tfevents.fixture")

# (step, [(tag, value)]) written as simple_value scalars; the values are exact in f32 only where
# they say so, the test compares against the f32 rounding of these literals.
SIMPLE = [
    (0, [("train/loss", 1.5)]),
    (1, [("train/loss", 0.75), ("train/reward", -0.25)]),
    (2, [("train/loss", 0.1), ("train/reward", 3.0e-5)]),
    (1_000_000, [("eval/diversity", 123456.789)]),
]
# one TensorFlow-2-style scalar: a one-element DT_FLOAT tensor with the "scalars" plugin
TENSOR = (7, "tf2/accuracy", 0.875)


def main():
    tmp = tempfile.mkdtemp()
    try:
        w = EventFileWriter(tmp)  # writes the file_version record itself
        for step, values in SIMPLE:
            s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values])
            w.add_event(event_pb2.Event(wall_time=1700000000.0 + step, step=step, summary=s))
        step, tag, v = TENSOR
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[v])
        s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, tensor=t, metadata=meta)])
        w.add_event(event_pb2.Event(wall_time=1700000100.0, step=step, summary=s))
        w.close()
        (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        shutil.copyfile(path, OUT)
    finally:
        shutil.rmtree(tmp)
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
