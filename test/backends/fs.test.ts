import { runConformance } from '../conformance/suite.js';
import { fsConformanceTarget } from '../harness/fs.js';

runConformance(await fsConformanceTarget());
