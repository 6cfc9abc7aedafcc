// Creates the bucket or container each cloud backend of docker-compose.yaml names, then exits 0.
// Run once by the `stores-init` service, from the Stevedore image (its SDKs are in node_modules);
// the stores may still be starting, so every step is retried for a minute.
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { BlobServiceClient } from '@azure/storage-blob';
import { Storage } from '@google-cloud/storage';

const bucket = process.env.INIT_BUCKET ?? 'stevedore';
const steps = {
  minio: async () => {
    const s3 = new S3Client({ endpoint: process.env.INIT_S3_ENDPOINT, region: 'us-east-1', forcePathStyle: true });
    await s3.send(new CreateBucketCommand({ Bucket: bucket })).catch((err) => {
      if (!['BucketAlreadyOwnedByYou', 'BucketAlreadyExists'].includes(err.name)) throw err;
    });
  },
  azurite: async () => {
    await BlobServiceClient.fromConnectionString(process.env.AZURE_STORAGE_CONNECTION_STRING).getContainerClient(bucket).createIfNotExists();
  },
  gcs: async () => {
    const storage = new Storage({ apiEndpoint: process.env.INIT_GCS_ENDPOINT, projectId: 'stevedore', useAuthWithCustomEndpoint: false });
    await storage.createBucket(bucket).catch((err) => { if (err.code !== 409) throw err; });
  },
};

for (const [store, step] of Object.entries(steps)) {
  for (let attempt = 1; ; attempt++) {
    try {
      await step();
      console.log(`${store}: ${bucket} ready`);
      break;
    } catch (err) {
      if (attempt === 30) {
        console.error(`${store}: cannot create ${bucket}: ${err.message}`);
        process.exit(1);
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}
