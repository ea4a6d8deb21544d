/**
 * GitHub's own workflow validator (`@actions/workflow-parser`, the engine of the Actions
 * language server) for the CI tests. The package imports its JSON schema without
 * `with { type: "json" }`, which Deno and Node refuse at run time (actions/languageservices#387),
 * so it is bundled once per process with `deno bundle` (esbuild inlines the JSON) and imported
 * from the bundle; the types still come from the package itself.
 * @module
 */
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import type * as WorkflowParser from "@actions/workflow-parser";
import type { WorkflowTemplate } from "@actions/workflow-parser";

/** The parts of `@actions/workflow-parser` the tests use. */
export type WorkflowParserApi = Pick<
  typeof WorkflowParser,
  "parseWorkflow" | "convertWorkflowTemplate" | "NoOperationTraceWriter"
>;

const ROOT = resolve(import.meta.dirname!, "../..");
let loading: Promise<WorkflowParserApi> | undefined;

async function bundleAndImport(): Promise<WorkflowParserApi> {
  const dir = await Deno.makeTempDir({ prefix: "lathe-workflow-parser-" });
  try {
    const entry = join(dir, "entry.ts");
    const bundle = join(dir, "workflow_parser.js");
    await Deno.writeTextFile(entry, 'export * from "@actions/workflow-parser";\n');
    const out = await new Deno.Command(Deno.execPath(), {
      args: [
        "bundle",
        "--quiet",
        "--config",
        join(ROOT, "deno.json"),
        "--platform",
        "deno",
        "--output",
        bundle,
        entry,
      ],
      cwd: ROOT,
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!out.success) {
      throw new Error(`Cannot bundle @actions/workflow-parser: ${new TextDecoder().decode(out.stderr)}`);
    }
    return await import(pathToFileURL(bundle).href) as WorkflowParserApi;
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** `@actions/workflow-parser`, bundled and imported on first use. */
export function loadWorkflowParser(): Promise<WorkflowParserApi> {
  loading ??= bundleAndImport();
  return loading;
}

/** What {@link validateWorkflow} found. */
export interface WorkflowCheck {
  /** Every schema, expression and job-graph error, as `<name> (Line: l, Col: c): message`. */
  errors: string[];
  /** The converted workflow (jobs, events), when it parsed. */
  template?: WorkflowTemplate;
}

/**
 * Validates workflow text the way GitHub does before it runs it: YAML, the workflow schema,
 * expressions, then the conversion to jobs (needs, matrix, events).
 */
export async function validateWorkflow(name: string, content: string): Promise<WorkflowCheck> {
  const { parseWorkflow, convertWorkflowTemplate, NoOperationTraceWriter } = await loadWorkflowParser();
  const parsed = parseWorkflow({ name, content }, new NoOperationTraceWriter());
  const errors = parsed.context.errors.getErrors().map((e) => e.message);
  if (!parsed.value) return { errors };
  const template = await convertWorkflowTemplate(parsed.context, parsed.value);
  for (const e of template.errors ?? []) if (!errors.includes(e.Message)) errors.push(e.Message);
  for (const e of parsed.context.errors.getErrors()) if (!errors.includes(e.message)) errors.push(e.message);
  return { errors, template };
}
