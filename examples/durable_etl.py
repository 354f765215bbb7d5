"""A durable ETL flow that survives being killed.

Run it, press Ctrl-C (or kill -9 it) half-way, run it again: it resumes where the
journal says each record stopped, finishes every record exactly once, and shows the one
bad record in the dead letters.

    python examples/durable_etl.py [journal.db]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile

from pydotcompute.coordinator import FanIn, FanOut, deploy, stage

QUICK = os.environ.get("PYDOTCOMPUTE_EXAMPLE_QUICK") == "1"
RECORDS = 200 if QUICK else 5_000


def parse(line: str) -> dict:
    name, amount = line.split(",")
    return {"name": name.strip(), "amount": float(amount)}


@stage(workers=4, retries=3, backoff=0.01)
async def lookup_rate(rec: dict) -> float:
    await asyncio.sleep(0.001)  # a currency service
    return 1.1 if rec["name"].endswith("eu") else 1.0


async def lookup_risk(rec: dict) -> str:
    await asyncio.sleep(0.001)  # a scoring service
    return "high" if rec["amount"] > 900 else "low"


def combine(parts: list) -> dict:
    rate, risk = parts
    return {"usd": round(rate * 100, 2), "risk": risk}


GRAPH = (
    stage(parse, retries=1)
    >> FanOut(lookup_rate, stage(lookup_risk), mode="broadcast")
    >> FanIn(combine)
)


async def main(path: str) -> None:
    async with await deploy(None, GRAPH, name="etl", journal=path) as flow:
        lines = [f"customer{i}{'-eu' if i % 3 == 0 else ''}, {i % 1000}" for i in range(RECORDS)]
        lines[7] = "not a record"  # goes to the dead letters: parse raises
        # Known keys are skipped, so a restart submits nothing twice.
        await flow.submit_many(lines, keys=[f"line-{i}" for i in range(RECORDS)])
        await flow.drain(progress=True)  # a bar when run in a terminal
        print("status:", flow.status())
        print("line-3:", await flow.result("line-3"))
        for rec in flow.dead_letters():
            print(f"dead letter {rec.key} at {rec.stage}: {rec.error}")
        assert flow.status() == {"done": RECORDS - 1, "dead": 1}


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "etl.db")
    print("journal:", target)
    try:
        asyncio.run(main(target))
    except KeyboardInterrupt:
        print("\nstopped; run it again to resume from the journal", target)
