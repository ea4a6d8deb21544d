/**
 * The run tracker (DESIGN §5): a DuckDB index of every run, rebuilt from the manifests
 * at any time. Runners index each finished step through {@link trackerHook}; the `runs`
 * command ({@link runsCli}) lists, shows, compares, queries, plots, exports and imports.
 *
 * @example
 * ```ts
 * import { queryRows, readIndex } from "./mod.ts";
 * import { runsRoot, trackerDbPath } from "../foundation/paths.ts";
 * const runs = runsRoot();
 * const rows = await readIndex(trackerDbPath(runs), runs, (conn) =>
 *   queryRows(conn, "SELECT run_id, loss FROM run_summary ORDER BY started_at DESC LIMIT 5"));
 * ```
 * @module
 */
export { type Print, runsCli } from "./cli.ts";
export {
  backoffMs,
  type DbOptions,
  insertRows,
  inTransaction,
  isLockError,
  queryRows,
  queryTable,
  sqlString,
  withDb,
} from "./db.ts";
export {
  checkExport,
  EXPORT_INFO_FILE,
  EXPORT_SCHEMA,
  exportIndex,
  ExportInfo,
  importExport,
  type ImportResult,
  importRows,
  parquetPath,
} from "./export.ts";
export { trackerHook } from "./hook.ts";
export {
  ensureIndex,
  type FoundRecord,
  type IndexedStep,
  indexManifest,
  indexManifestFile,
  type MetricPoint,
  METRICS_FILE,
  type ParsedMetrics,
  parseMetricsJsonl,
  readIndex,
  refreshRun,
  reindex,
  reindexConn,
  type ReindexResult,
  type ScanResult,
  scanRuns,
  writeIndex,
} from "./index.ts";
export { escapeXml, niceTicks, type PlotOptions, type PlotSeries, renderSvg } from "./plot.ts";
export {
  type ArtifactRow,
  compareRuns,
  type Comparison,
  type ConfigDiff,
  type FinalMetric,
  flattenConfig,
  listRuns,
  type MetricComparison,
  metricSeries,
  resolveRunId,
  type RunDetail,
  runDetail,
  type RunListRow,
  type Series,
  type StepRow,
} from "./queries.ts";
export {
  createSchema,
  dropSchema,
  SCHEMA_VERSION,
  storedSchemaVersion,
  type TableName,
  TABLES,
  VIEWS,
} from "./schema.ts";
export { type Cell, formatCsv, formatNumber, formatTable, type TableOptions } from "./table.ts";
