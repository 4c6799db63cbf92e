"""What crash-contained decoding costs: ``ingest.read`` (decoder child) against the same plugin in-process.

    .venv/bin/python bench/isolation.py                   # RG1_J2KI (JPEG 2000) and RG1_UNCR (uncompressed)
    .venv/bin/python bench/isolation.py --repeat 25 --file X.dcm

Reports medians, not tests. Uncompressed data is never sent to the child, so its two numbers should agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import pixel_array

from xraybatch import ingest, isolation
from xraybatch.settings import IngestConfig


def _median_ms(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", action="append", type=Path, help="DICOM file (repeatable)")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    files = args.file or [Path(get_testdata_file(n)) for n in ("RG1_J2KI.dcm", "RG1_UNCR.dcm")]
    cfg = IngestConfig()
    for path in files:
        header, ds = ingest.read_header(path, cfg)
        ingest.check_image(header, ds, cfg)
        start = time.perf_counter()
        ingest.read(header)
        first = 1000 * (time.perf_counter() - start)
        isolated = _median_ms(lambda h=header: ingest.read(h), args.repeat)
        plugin = (isolation.plugin_order(header.transfer_syntax_uid) or ("",))[0]

        def in_process(p: Path = path, plugin: str = plugin) -> None:
            data = dcmread(p)
            _ = pixel_array(data, decoding_plugin=plugin) if plugin else data.pixel_array

        direct = _median_ms(in_process, args.repeat)
        where = "decoder child" if isolation.needs_isolation(header.transfer_syntax_uid) else "in-process (native)"
        print(
            f"{path.name}: ingest.read {isolated:.1f} ms ({where}; first call {first:.0f} ms), "
            f"same plugin ({plugin or 'pydicom'}) in-process {direct:.1f} ms, "
            f"overhead {isolated - direct:+.1f} ms ({100 * (isolated - direct) / direct:+.0f} %)"
        )


if __name__ == "__main__":
    main()
