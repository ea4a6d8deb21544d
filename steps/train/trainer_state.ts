/**
 * `trainer_state.json` as transformers' `TrainerState.save_to_json` writes it (the fields a
 * single-process run has), so tools that read a transformers output directory read lathe's.
 * `log_history` holds one entry per logging step (`loss`, `learning_rate`, `grad_norm`), one per
 * evaluation (`eval_loss`) and a final summary (`train_loss`, `train_runtime`).
 * @module
 */

/** One `log_history` entry. */
export interface LogEntry {
  step: number;
  epoch: number;
  loss?: number;
  learning_rate?: number;
  grad_norm?: number;
  /** Token slots per second over the logging window (lathe's addition). */
  tokens_per_second?: number;
  eval_loss?: number;
  train_loss?: number;
  train_runtime?: number;
  train_tokens_per_second?: number;
}

/** The JSON object. */
export interface TrainerState {
  best_metric: number | null;
  best_model_checkpoint: string | null;
  epoch: number;
  eval_steps: number | null;
  global_step: number;
  is_hyper_param_search: false;
  is_local_process_zero: true;
  is_world_process_zero: true;
  log_history: LogEntry[];
  logging_steps: number;
  max_steps: number;
  num_input_tokens_seen: number;
  num_train_epochs: number;
  save_steps: number | null;
  total_flos: number;
  train_batch_size: number;
  trial_name: null;
  trial_params: null;
}

/** What {@link trainerState} needs. */
export interface TrainerStateInput {
  step: number;
  epoch: number;
  history: LogEntry[];
  bestEvalLoss: number | null;
  evalSteps: number | null;
  loggingSteps: number;
  maxSteps: number;
  epochs: number;
  saveSteps: number | null;
  tokens: number;
  batchSize: number;
}

/** Builds the state object (keys in transformers' sorted order). */
export function trainerState(s: TrainerStateInput): TrainerState {
  return {
    best_metric: s.bestEvalLoss,
    best_model_checkpoint: null,
    epoch: s.epoch,
    eval_steps: s.evalSteps,
    global_step: s.step,
    is_hyper_param_search: false,
    is_local_process_zero: true,
    is_world_process_zero: true,
    log_history: s.history.map((e) => ({ ...e })),
    logging_steps: s.loggingSteps,
    max_steps: s.maxSteps,
    num_input_tokens_seen: s.tokens,
    num_train_epochs: s.epochs,
    save_steps: s.saveSteps,
    total_flos: 0,
    train_batch_size: s.batchSize,
    trial_name: null,
    trial_params: null,
  };
}
