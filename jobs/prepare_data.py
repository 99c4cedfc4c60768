"""Convert images into Parquet shards + manifest.json for training (local folder or s3://bucket/prefix).

    python jobs/prepare_data.py --dataset fashion-mnist                       # embedded real dataset, no download
    python jobs/prepare_data.py --src /data/imagenet --output s3://bucket/imagenet --shard-size-mb 256

--src is an ImageFolder tree (train/<class>/*.JPEG, val/<class>/*.JPEG) or an uncompressed .tar of one. Resumable:
re-running skips shards already written with a matching checksum. S3 settings come from the standard AWS env vars
(AWS_ENDPOINT_URL for S3-compatible stores).
"""

import sys

from arm_platform.data import ingest

if __name__ == "__main__":
    ingest.main(sys.argv[1:])
