#!/usr/bin/env python3
"""Example dicomgw pipeline: summarize a payload, optionally send it back.

dicomgw runs it as  summarize.py {manifest} {output} [--copy]  with the
environment variables DICOMGW_PAYLOAD_DIR, DICOMGW_MANIFEST, DICOMGW_OUTPUT_DIR,
DICOMGW_PAYLOAD_ID, DICOMGW_PIPELINE, DICOMGW_AE and DICOMGW_ATTEMPT set.

It writes summary.json into the output directory: the payload id, the number
of instances and the studies and series they belong to.  With --copy it also
copies every instance into the output directory, so that the pipeline's
"export" destinations receive them (an echo-back pipeline).  Exit status 0
tells dicomgw the job is done; anything else makes it retry.
"""

import json
import os
import shutil
import sys


def main(argv):
    manifest_path = argv[1] if len(argv) > 1 else os.environ["DICOMGW_MANIFEST"]
    output = argv[2] if len(argv) > 2 else os.environ["DICOMGW_OUTPUT_DIR"]
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    payload_dir = os.path.dirname(os.path.abspath(manifest_path))
    studies = {}
    for inst in manifest["instances"]:
        series = studies.setdefault(inst["study_instance_uid"], {})
        series[inst["series_instance_uid"]] = series.get(inst["series_instance_uid"], 0) + 1
        if "--copy" in argv:
            shutil.copyfile(os.path.join(payload_dir, inst["path"]), os.path.join(output, inst["path"]))
    summary = {
        "payload": manifest["payload"],
        "ae": manifest["ae"],
        "instances": len(manifest["instances"]),
        "studies": studies,
        "associations": [a["id"] for a in manifest["associations"]],
    }
    with open(os.path.join(output, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"payload {manifest['payload']}: {len(manifest['instances'])} instance(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
