import { MemoryDriver } from '../../src/backends/memory.js';
import { runConformance } from '../conformance/suite.js';

const driver = new MemoryDriver();
runConformance({
  name: 'memory',
  driver: async () => driver,
  corrupt: async (key, bytes) => driver.corrupt(key, bytes),
  multipartThreshold: 1 << 20,
  teardown: async () => {},
});
