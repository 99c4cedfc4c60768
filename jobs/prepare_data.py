"""Convert images into Parquet shards + manifest.json for training (local folder or s3://bucket/prefix).

    python jobs/prepare_data.py --dataset fashion-mnist                       # embedded real dataset, no download
    python jobs/prepare_data.py --src /data/imagenet --output s3://bucket/imagenet --shard-size-mb 256

--src is an ImageFolder tree (train/<class>/*.JPEG, val/<class>/*.JPEG) or an uncompressed .tar of one. Resumable:
re-running re-hashes every shard already written and skips those whose sha256 still matches (damaged ones are
rewritten). Every PIL mode is converted to 8-bit RGB (16-bit and float grayscale scaled, alpha composited on white);
unreadable files, undecodable names and symlink loops are skipped and counted per shard; tar members escaping the
source are rejected and counted in the manifest; nothing is ever written outside --output. S3 settings come from
the standard AWS env vars (AWS_ENDPOINT_URL for S3-compatible stores).
"""

import sys

from arm_platform.data import ingest

if __name__ == "__main__":
    ingest.main(sys.argv[1:])
