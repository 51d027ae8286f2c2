#!/bin/sh
# Run by the minio-init service (docker-compose.yml) on every start: the
# results bucket, and an application user whose policy allows only that
# bucket's objects. MINIO_ROOT_USER stays the operators' root. Idempotent.
set -eu
mc alias set root http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "root/$S3_BUCKET"
cat > /tmp/tareas-results.json <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
     "Resource": ["arn:aws:s3:::$S3_BUCKET"]},
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
     "Resource": ["arn:aws:s3:::$S3_BUCKET/*"]}
  ]
}
JSON
mc admin user add root "$TAREAS_S3_ACCESS_KEY" "$TAREAS_S3_SECRET_KEY"
mc admin policy create root tareas-results /tmp/tareas-results.json
mc admin policy attach root tareas-results --user "$TAREAS_S3_ACCESS_KEY" 2>/dev/null || true
echo "minio-init: user $TAREAS_S3_ACCESS_KEY limited to bucket $S3_BUCKET"
