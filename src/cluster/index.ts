/** The local cluster (controller + agents in test hosts on one machine) and its test hosts. */
export { clusterUp } from './local-cluster.js';
export {
  DEFAULT_RUN_DIR,
  DEFAULT_STATE_DIR,
  LOCAL_NETWORK,
  MAX_NODES,
  readClusterState,
  type ClusterUpOptions,
  type ClusterUpResult,
  type LocalClusterDirs,
  type LocalClusterNode,
  type LocalClusterState,
} from './state.js';
export { clusterDown, type ClusterDownResult } from './down.js';
export { CLUSTER_DAEMONS, clusterKill, clusterRevive, type ClusterDaemon, type KillResult, type ReviveResult } from './faults.js';
export {
  createTestHost,
  deleteBridge,
  deleteTestHost,
  ensureBridge,
  inNetns,
  killAllInHost,
  netnsExists,
  netnsPath,
  type TestHost,
  type TestNetwork,
} from './testhost.js';
