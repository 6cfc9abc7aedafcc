// The filesystem backend, split along its seams under ./fs/: driver (put, get, list, delete),
// write (the put's write loop), sidecar (metadata lookup, copied trees), claim (ifMatch),
// contain (staying inside the root), sweep. Importers keep this path.
export { FsDriver, fsDriverFromUrl, type FsDriverOptions } from './fs/driver.js';
export { META_DIR } from './fs/layout.js';
