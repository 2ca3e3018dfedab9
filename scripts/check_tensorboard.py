"""Print the scalars that TensorBoard's own reader finds in an event file or a run folder.

For humans checking that orwcfm-fast's event files are readable by TensorBoard (CI does not run
it). Needs only the `tensorboard` package:

    python3 -m venv /tmp/tbvenv && /tmp/tbvenv/bin/pip install tensorboard
    /tmp/tbvenv/bin/python scripts/check_tensorboard.py runs/<run_name>/
    /tmp/tbvenv/bin/python scripts/check_tensorboard.py runs/<run_name>/events.out.tfevents.<...>

A folder is read as TensorBoard reads a run: every event file in it, in name order, with the
points that a resumed run overwrote dropped.
"""

import argparse
import sys

from tensorboard.backend.event_processing import event_accumulator


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="an events.out.tfevents.* file or a run folder holding them")
    ap.add_argument("--limit", type=int, default=0, help="print at most this many points per tag (0: all)")
    args = ap.parse_args()

    acc = event_accumulator.EventAccumulator(args.path, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = tags.get(event_accumulator.SCALARS, [])
    print(f"{args.path}: {len(scalars)} scalar tag(s)")
    for tag in scalars:
        events = acc.Scalars(tag)
        print(f"{tag}: {len(events)} point(s)")
        shown = events if args.limit <= 0 else events[: args.limit]
        for e in shown:
            print(f"  step {e.step:>8}  value {e.value!r}")
        if len(shown) < len(events):
            print(f"  ... {len(events) - len(shown)} more")
    tensors = tags.get(event_accumulator.TENSORS, [])
    if tensors:
        print(f"(also {len(tensors)} tensor tag(s), e.g. TensorFlow 2 scalars: {', '.join(tensors)})")
    if not scalars and not tensors:
        print("no scalars found", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
