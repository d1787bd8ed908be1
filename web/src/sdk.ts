// Vigil's browser SDK: open the camera, stream JPEG frames to an edge over one WebSocket, and
// hand back typed results, actions, liveness challenges and connection states. The protocol is
// docs/protocol.md.
//
// Flow control follows the edge: never more than `max_inflight` frames without an answer, the
// rate the edge asks for (`welcome.max_fps`, then each `throttle`), and JPEGs under
// `max_frame_bytes`. Reconnection follows the rules in `closeDecision` below.

import { decode, encode } from "@msgpack/msgpack";

export type Verdict =
  | "ok"
  | "no_face"
  | "multiple_faces"
  | "low_quality"
  | "spoof"
  | "wrong_person"
  | "phone"
  | "no_frames"
  | "invalid_frame";
export type ActionName = "allow" | "warn" | "lock_screen" | "sign_out";

export interface Welcome {
  type: "welcome";
  session_id: string;
  max_frame_bytes: number;
  max_fps: number;
  max_inflight: number;
}
/** A face found in the frame, in the frame's pixels. */
export interface FaceBox {
  x: number;
  y: number;
  w: number;
  h: number;
  score: number;
}
/**
 * The model stack's answer for one frame. A client gets the verdict, the face boxes and the
 * model versions; the scores behind them come only when the edge is configured to send them
 * (`VIGIL_EDGE_CLIENT_SCORES`, for development), hence optional.
 */
export interface IdentityAnalysis {
  kind: "identity";
  verdict: Verdict;
  faces: FaceBox[];
  /** `name:version` of each model that ran. */
  models: string[];
  identity?: { similarity: number; matched: boolean } | null;
  liveness?: { p_live: number; pad?: number; live: boolean; [k: string]: unknown } | null;
  phone?: ({ score: number } & Omit<FaceBox, "score">) | null;
  thresholds?: Record<string, number>;
  quality?: { face_px: number; sharpness: number; brightness: number; yaw: number; pitch: number; failed?: string } | null;
}
/** Transport facts from the JPEG markers (the `frame-info` analyzer). */
export interface FrameInfoAnalysis {
  kind: "frame_info";
  width: number;
  height: number;
  components: number;
}
export type Analysis = IdentityAnalysis | FrameInfoAnalysis;
export interface ResultMsg {
  type: "result";
  seq: number;
  latency_ms: number;
  frame_id: string;
  trace_id?: string;
  analyzer: string;
  analysis: Analysis;
}
export interface DroppedMsg {
  type: "dropped";
  seq: number;
  reason: string;
  detail: string;
}
export interface ActionMsg {
  type: "action";
  action: ActionName;
  reason: string;
  action_id: string;
  evidence_id: string;
}
export interface StatusMsg {
  type: "status";
  state: "paused" | "active";
}
export interface ThrottleMsg {
  type: "throttle";
  max_fps: number;
}
export interface ErrorMsg {
  type: "error";
  code: string;
  message: string;
}
export interface PongMsg {
  type: "pong";
  id?: number;
}
/** One step of a challenge. Directions are the candidate's own: `turn_left` is a turn of the
 * head to the candidate's left (the screen's left in a mirrored preview), then back. */
export type ChallengeStepKind = "turn_left" | "turn_right";
export interface ChallengeStep {
  kind: ChallengeStepKind;
}
/** Why a challenge was issued. */
export type ChallengeReason = "start" | "suspicion" | "operator" | "random" | "retry";
/** An active liveness check: do `steps` in order within `deadline_ms` of its arrival. A new
 * one replaces any earlier one; after a reconnect the same `id` may come again with less time. */
export interface ChallengeMsg {
  type: "challenge";
  id: string;
  steps: ChallengeStep[];
  deadline_ms: number;
  reason: ChallengeReason;
}
/** `done` steps are complete: the next one is `steps[done]`. */
export interface ChallengeProgressMsg {
  type: "challenge_progress";
  id: string;
  done: number;
}
/** The challenge ended; `reason` says why it failed (`timeout`, …), `passed` when it did not. */
export interface ChallengeResultMsg {
  type: "challenge_result";
  id: string;
  passed: boolean;
  reason: string;
}
/** The `challenge` event: the message, and when its deadline runs out (`Date.now()` clock). */
export interface ChallengeEvent extends ChallengeMsg {
  expiresAt: number;
}
export type ServerMsg =
  | Welcome
  | ResultMsg
  | DroppedMsg
  | ActionMsg
  | StatusMsg
  | ThrottleMsg
  | ErrorMsg
  | PongMsg
  | ChallengeMsg
  | ChallengeProgressMsg
  | ChallengeResultMsg;

/** Where the connection stands. The last six are final: the client stops. `interrupted`: the
 * connection is up but no frame can be captured (see the `capture` event for why). */
export type ConnectionState =
  | "connecting"
  | "streaming"
  | "paused"
  | "interrupted"
  | "reconnecting"
  | "stopped"
  | "replaced"
  | "blocked"
  | "unauthorized"
  | "kicked"
  | "refused"
  | "signed_out";

export interface StateChange {
  state: ConnectionState;
  /** The close code or error code behind the change, when there is one. */
  code?: number | string;
  detail?: string;
  /** For `reconnecting`: the wait before the next attempt, in ms. */
  retryInMs?: number;
}

/**
 * What stands in the way of capturing, as the client sees it: `camera_lost` (the camera's track
 * ended: unplugged, taken by another app, permission revoked), `encoder_failed` (the browser
 * could not encode a frame), `hidden` (the page is in a background tab, where browsers starve
 * timers); `ok` once frames flow again. Each is also told to the edge, which audits the
 * candidate's absence from its own word rather than waiting for the silence.
 */
export type CaptureProblem = "camera_lost" | "encoder_failed" | "hidden";
export interface CaptureEvent {
  state: CaptureProblem | "ok";
  detail?: string;
}

export interface VigilEvents {
  welcome: Welcome;
  result: ResultMsg;
  dropped: DroppedMsg;
  action: ActionMsg;
  status: StatusMsg;
  throttle: ThrottleMsg;
  error: ErrorMsg;
  challenge: ChallengeEvent;
  challenge_progress: ChallengeProgressMsg;
  challenge_result: ChallengeResultMsg;
  capture: CaptureEvent;
  state: StateChange;
}

export interface VigilOptions {
  /** `ws(s)://host:port/v1/stream`. */
  url: string;
  clientId: string;
  token: string;
  /** Capture size and rate asked of the camera (the edge's `max_fps` caps the rate sent). */
  width?: number;
  height?: number;
  fps?: number;
  /** JPEG quality, 0..1. Lowered by itself when frames come out above `max_frame_bytes`. */
  quality?: number;
  encoding?: "msgpack" | "json";
  /** Reconnect backoff: full jitter over `baseMs * 2^attempt`, capped at `maxMs`. */
  reconnect?: { baseMs?: number; maxMs?: number; maxAttempts?: number };
  /** The frame encoder's worker script (dist/encoder.js); without it, frames are encoded on the main thread. */
  workerUrl?: string | URL;
  /** An application ping every this many ms; no message for twice as long means the link is dead. */
  pingIntervalMs?: number;
  /** A `<video>` element to show the camera in. */
  preview?: HTMLVideoElement;
}

export const SUBPROTOCOLS = { msgpack: "vigil.v1.msgpack", json: "vigil.v1.json" } as const;

/**
 * What a close means for the client (documented in docs/protocol.md, "Reconnecting"):
 * - replaced by a newer session (4409): stop, and never fight back;
 * - blocked (4403), unauthorized (4401), kicked (4000), a bad request (4400): stop;
 * - signed out (4423): stop until an operator re-admits the client;
 * - anything else (network loss, 1001 shutdown, 4503 full, 4410 idle, 4408 slow, 4429 too
 *   fast): reconnect after a jittered, growing delay.
 */
export function closeDecision(code: number): ConnectionState | "retry" {
  switch (code) {
    case 4409:
      return "replaced";
    case 4403:
      return "blocked";
    case 4401:
      return "unauthorized";
    case 4000:
      return "kicked";
    case 4400:
      return "refused";
    case 4423:
      return "signed_out";
    default:
      return "retry";
  }
}

/** Full jitter: a uniform wait in [0, min(max, base * 2^attempt)]. */
export function backoffMs(attempt: number, baseMs: number, maxMs: number, random = Math.random): number {
  const ceiling = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 20));
  return Math.floor(random() * ceiling);
}

/** What the client measured of its own work, for benchmarks and diagnostics. */
export interface ClientStats {
  /** Frames sent, and answers (results and drops) received, since `start()`. */
  sent: number;
  results: number;
  dropped: number;
  /** Capture ticks skipped because `max_inflight` frames were still unanswered. */
  heldBack: number;
  /** Seconds since `start()`. */
  seconds: number;
  /** JPEG encoding per frame (in the worker when there is one), in ms: mean and 95th percentile. */
  encodeMs: { mean: number; p95: number };
  /** Main-thread work per frame (grabbing the bitmap, packing and sending), in ms. */
  mainThreadMs: { mean: number; p95: number };
  /** Whether frames are encoded off the main thread. */
  offMainThread: boolean;
}

const SAMPLES = 1000;

function summary(xs: number[]): { mean: number; p95: number } {
  if (xs.length === 0) return { mean: 0, p95: 0 };
  const sorted = [...xs].sort((a, b) => a - b);
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
  return { mean, p95: sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.95))] };
}

function push(xs: number[], x: number) {
  xs.push(x);
  if (xs.length > SAMPLES) xs.shift();
}

type Encoder = ((frame: ImageBitmap, quality: number) => Promise<{ jpeg: ArrayBuffer; ms: number }>) & {
  offMainThread: boolean;
};

/** The longest a frame's encoding may take before it counts as failed. */
const ENCODE_TIMEOUT_MS = 5_000;

/** Encode on the main thread with a canvas. */
function canvasEncoder(): Encoder {
  const canvas = document.createElement("canvas");
  const encode = async (frame: ImageBitmap, quality: number) => {
    const started = performance.now();
    canvas.width = frame.width;
    canvas.height = frame.height;
    const ctx = canvas.getContext("2d");
    if (!ctx) throw new Error("no 2d canvas");
    ctx.drawImage(frame, 0, 0);
    frame.close();
    const blob = await new Promise<Blob | null>((r) => canvas.toBlob(r, "image/jpeg", quality));
    if (!blob) throw new Error("the browser could not encode a JPEG");
    return { jpeg: await blob.arrayBuffer(), ms: performance.now() - started };
  };
  return Object.assign(encode, { offMainThread: false });
}

/** JPEG encoding off the main thread (OffscreenCanvas in a worker) when the browser allows.
 * Every encoding ends: with the JPEG, or an error when the worker fails, reports an error, or
 * takes longer than `ENCODE_TIMEOUT_MS`. */
function makeEncoder(workerUrl?: string | URL): Encoder {
  const offscreen =
    typeof OffscreenCanvas !== "undefined" && "convertToBlob" in OffscreenCanvas.prototype;
  if (workerUrl && offscreen && typeof Worker !== "undefined") {
    const worker = new Worker(workerUrl, { type: "module" });
    let next = 0;
    type Waiting = { resolve: (r: { jpeg: ArrayBuffer; ms: number }) => void; reject: (e: Error) => void };
    const waiting = new Map<number, Waiting>();
    const failAll = (why: string) => {
      for (const w of waiting.values()) w.reject(new Error(why));
      waiting.clear();
    };
    worker.onmessage = (e: MessageEvent<{ id: number; jpeg?: ArrayBuffer; ms?: number; error?: string }>) => {
      const w = waiting.get(e.data.id);
      waiting.delete(e.data.id);
      if (!w) return;
      if (e.data.jpeg && e.data.ms !== undefined) w.resolve({ jpeg: e.data.jpeg, ms: e.data.ms });
      else w.reject(new Error(e.data.error ?? "the encoder worker sent no JPEG"));
    };
    worker.onerror = (e) => failAll(`the encoder worker failed: ${e.message || "unknown error"}`);
    worker.onmessageerror = () => failAll("the encoder worker's answer could not be read");
    const encode = (frame: ImageBitmap, quality: number) =>
      new Promise<{ jpeg: ArrayBuffer; ms: number }>((resolve, reject) => {
        const id = next++;
        const timer = setTimeout(() => {
          waiting.delete(id);
          reject(new Error(`the encoder worker did not answer within ${ENCODE_TIMEOUT_MS} ms`));
        }, ENCODE_TIMEOUT_MS);
        waiting.set(id, {
          resolve: (r) => (clearTimeout(timer), resolve(r)),
          reject: (e) => (clearTimeout(timer), reject(e)),
        });
        worker.postMessage({ id, frame, quality }, [frame]);
      });
    return Object.assign(encode, { offMainThread: true });
  }
  return canvasEncoder();
}

function base64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

export class VigilClient {
  private readonly opts: Required<Omit<VigilOptions, "workerUrl" | "preview">> &
    Pick<VigilOptions, "workerUrl" | "preview">;
  private readonly target = new EventTarget();
  private ws?: WebSocket;
  private camera?: MediaStream;
  private video?: HTMLVideoElement;
  private encoder?: Encoder;
  private welcome?: Welcome;
  private inflight = new Set<number>();
  private seq = 0;
  private encoding = false;
  private quality: number;
  private fps: number;
  private paused = false;
  private stopped = false;
  private attempt = 0;
  private timer?: ReturnType<typeof setTimeout>;
  private pingTimer?: ReturnType<typeof setInterval>;
  private lastHeard = 0;
  private retryTimer?: ReturnType<typeof setTimeout>;
  /** Set by a `signed_out` error: whatever close follows is final. */
  private signedOut = false;
  /** What stops capturing now, if anything (`capture` events, and the edge, hear of it). */
  private problems = new Set<CaptureProblem>();
  private onVisibility?: () => void;
  private onDeviceChange?: () => void;
  state: ConnectionState = "stopped";
  private startedAt = 0;
  private nextDue = 0;
  private counts = { sent: 0, results: 0, dropped: 0, heldBack: 0 };
  private encodeMs: number[] = [];
  private mainMs: number[] = [];

  /** What the client measured of its own work since `start()`. */
  stats(): ClientStats {
    return {
      ...this.counts,
      seconds: (performance.now() - this.startedAt) / 1000,
      encodeMs: summary(this.encodeMs),
      mainThreadMs: summary(this.mainMs),
      offMainThread: this.encoder?.offMainThread ?? false,
    };
  }

  constructor(options: VigilOptions) {
    this.opts = {
      width: 640,
      height: 480,
      fps: 5,
      quality: 0.8,
      encoding: "msgpack",
      reconnect: {},
      pingIntervalMs: 10_000,
      ...options,
    };
    this.quality = this.opts.quality;
    this.fps = this.opts.fps;
  }

  /** Listen for one kind of event, typed. Returns a function that stops listening. */
  on<K extends keyof VigilEvents>(type: K, handler: (e: VigilEvents[K]) => void): () => void {
    const listener = (e: Event) => handler((e as CustomEvent<VigilEvents[K]>).detail);
    this.target.addEventListener(type, listener);
    return () => this.target.removeEventListener(type, listener);
  }

  private emit<K extends keyof VigilEvents>(type: K, detail: VigilEvents[K]) {
    this.target.dispatchEvent(new CustomEvent(type, { detail }));
  }

  private setState(change: StateChange) {
    this.state = change.state;
    this.emit("state", change);
  }

  /** Open the camera, then connect and stream until `stop()` or a final close. Throws when the
   * page cannot use a camera at all: `navigator.mediaDevices` exists only on `https://` pages
   * (and `http://localhost`). */
  async start(): Promise<void> {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error(
        "this page cannot use a camera: browsers allow it only on https:// pages (and on http://localhost)",
      );
    }
    this.stopped = false;
    this.signedOut = false;
    await this.openCamera();
    // Stopped while the camera was being opened (a permission prompt can take long): nothing
    // more starts.
    if (this.stopped) return;
    this.encoder = makeEncoder(this.opts.workerUrl);
    this.startedAt = performance.now();
    this.onVisibility = () =>
      document.visibilityState === "hidden" ? this.report("hidden") : this.clear("hidden");
    this.onDeviceChange = () => {
      // A camera plugged back in (or another one) after the one in use was lost.
      if (this.problems.has("camera_lost") && !this.stopped) {
        void this.openCamera().then(() => this.clear("camera_lost"), () => {});
      }
    };
    document.addEventListener("visibilitychange", this.onVisibility);
    navigator.mediaDevices.addEventListener?.("devicechange", this.onDeviceChange);
    this.connect();
  }

  private async openCamera() {
    this.camera?.getTracks().forEach((t) => t.stop());
    const camera = await navigator.mediaDevices.getUserMedia({
      audio: false,
      video: {
        width: { ideal: this.opts.width },
        height: { ideal: this.opts.height },
        frameRate: { ideal: this.opts.fps },
      },
    });
    if (this.stopped) {
      // `stop()` came while the camera opened: release it at once.
      camera.getTracks().forEach((t) => t.stop());
      return;
    }
    this.camera = camera;
    for (const track of this.camera.getVideoTracks()) {
      // Unplugged, taken by another application, or permission revoked.
      track.addEventListener("ended", () => {
        if (!this.stopped) this.report("camera_lost", track.label);
      });
    }
    this.video = this.opts.preview ?? this.video ?? document.createElement("video");
    this.video.muted = true;
    this.video.playsInline = true;
    this.video.srcObject = this.camera;
    await this.video.play();
  }

  /** The problem to show and tell now: the latest of those still standing. */
  private get problem(): CaptureProblem | undefined {
    return [...this.problems].pop();
  }

  /** Something now stops capturing: tell the page and the edge, once. */
  private report(problem: CaptureProblem, detail?: string) {
    if (this.problems.has(problem)) return;
    this.problems.add(problem);
    this.emit("capture", { state: problem, detail });
    this.send({ type: "presence", state: problem });
    if (this.welcome && !this.paused) this.setState({ state: "interrupted", detail: problem });
  }

  /** `problem` is over. Frames flow again only when no other problem stands. */
  private clear(problem: CaptureProblem) {
    if (!this.problems.delete(problem)) return;
    const still = this.problem;
    this.emit("capture", { state: still ?? "ok" });
    this.send({ type: "presence", state: still ?? "ok" });
    if (!this.welcome) return;
    if (still) this.setState({ state: "interrupted", detail: still });
    else this.setState({ state: this.paused ? "paused" : "streaming" });
  }

  /** Stop streaming, close the socket and release the camera. */
  stop(state: ConnectionState = "stopped", code?: number | string, detail?: string) {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    this.ws?.close(1000, "bye");
    this.ws = undefined;
    this.camera?.getTracks().forEach((t) => t.stop());
    if (this.onVisibility) document.removeEventListener("visibilitychange", this.onVisibility);
    if (this.onDeviceChange) navigator.mediaDevices.removeEventListener?.("devicechange", this.onDeviceChange);
    this.setState({ state, code, detail });
  }

  private connect() {
    if (this.stopped) return;
    this.setState({ state: this.attempt === 0 ? "connecting" : "reconnecting" });
    const protocols =
      this.opts.encoding === "json"
        ? [SUBPROTOCOLS.json, SUBPROTOCOLS.msgpack]
        : [SUBPROTOCOLS.msgpack, SUBPROTOCOLS.json];
    const ws = new WebSocket(this.opts.url, protocols);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.inflight.clear();
    this.welcome = undefined;
    ws.onopen = () => {
      this.lastHeard = Date.now();
      this.send({ type: "hello", client_id: this.opts.clientId, token: this.opts.token });
      this.pingTimer = setInterval(() => this.ping(), this.opts.pingIntervalMs);
    };
    ws.onmessage = (e) => this.onMessage(e.data);
    ws.onclose = (e) => this.onClose(e.code, e.reason);
  }

  /** The negotiated encoding; an edge without subprotocols answers in the hello's. */
  private get json(): boolean {
    if (this.ws?.protocol === SUBPROTOCOLS.json) return true;
    if (this.ws?.protocol === SUBPROTOCOLS.msgpack) return false;
    return this.opts.encoding === "json";
  }

  private send(msg: Record<string, unknown>) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    if (this.json) {
      this.ws.send(JSON.stringify(msg));
    } else {
      this.ws.send(encode(msg));
    }
  }

  private ping() {
    // Browsers cannot send WebSocket pings: an application ping tells a dead link apart.
    if (Date.now() - this.lastHeard > 2 * this.opts.pingIntervalMs) {
      this.ws?.close(4001, "no answer to pings");
      return;
    }
    this.send({ type: "ping", id: Date.now() });
  }

  private onMessage(data: unknown) {
    this.lastHeard = Date.now();
    let msg: ServerMsg;
    try {
      msg = (typeof data === "string" ? JSON.parse(data) : decode(new Uint8Array(data as ArrayBuffer))) as ServerMsg;
    } catch {
      return;
    }
    switch (msg.type) {
      case "welcome":
        this.welcome = msg;
        this.attempt = 0;
        this.fps = Math.min(this.opts.fps, msg.max_fps);
        this.nextDue = 0;
        this.emit("welcome", msg);
        if (this.problem) {
          // A new session hears of what still stops capturing.
          this.send({ type: "presence", state: this.problem });
          this.setState({ state: "interrupted", detail: this.problem });
        } else {
          this.setState({ state: this.paused ? "paused" : "streaming" });
        }
        this.schedule();
        break;
      case "result":
        this.counts.results += 1;
        this.inflight.delete(msg.seq);
        this.emit("result", msg);
        break;
      case "dropped":
        this.counts.dropped += 1;
        this.inflight.delete(msg.seq);
        if (msg.reason === "frame_too_large") this.quality = Math.max(0.3, this.quality - 0.1);
        this.emit("dropped", msg);
        break;
      case "action":
        this.emit("action", msg);
        break;
      case "status":
        this.paused = msg.state === "paused";
        this.emit("status", msg);
        this.setState({ state: this.paused ? "paused" : "streaming" });
        break;
      case "throttle":
        this.fps = Math.min(this.opts.fps, msg.max_fps);
        this.emit("throttle", msg);
        break;
      case "error":
        if (msg.code === "signed_out") this.signedOut = true;
        this.emit("error", msg);
        break;
      case "challenge":
        this.emit("challenge", { ...msg, expiresAt: Date.now() + msg.deadline_ms });
        break;
      case "challenge_progress":
        this.emit("challenge_progress", msg);
        break;
      case "challenge_result":
        this.emit("challenge_result", msg);
        break;
      case "pong":
        break;
    }
  }

  private onClose(code: number, reason: string) {
    clearTimeout(this.timer);
    clearInterval(this.pingTimer);
    this.ws = undefined;
    if (this.stopped) return;
    // A `signed_out` error is final even if its 4423 close got lost on the way.
    const decision = this.signedOut ? "signed_out" : closeDecision(code);
    if (decision !== "retry") {
      this.stop(decision, code, reason);
      return;
    }
    const r = this.opts.reconnect;
    if (r.maxAttempts !== undefined && this.attempt >= r.maxAttempts) {
      this.stop("stopped", code, "gave up reconnecting");
      return;
    }
    const wait = backoffMs(this.attempt, r.baseMs ?? 500, r.maxMs ?? 30_000);
    this.attempt += 1;
    this.setState({ state: "reconnecting", code, detail: reason, retryInMs: wait });
    this.retryTimer = setTimeout(() => this.connect(), wait);
  }

  /** The next capture, on a steady cadence at the current rate: due one interval after the
   * last one was due (never in the past), so the time a capture takes does not slow the rate. */
  private schedule() {
    clearTimeout(this.timer);
    if (this.stopped || !this.welcome) return;
    const now = performance.now();
    this.nextDue = Math.max(this.nextDue + 1000 / Math.max(this.fps, 0.1), now);
    this.timer = setTimeout(() => {
      void this.capture().finally(() => this.schedule());
    }, this.nextDue - now);
  }

  private async capture() {
    const welcome = this.welcome;
    const video = this.video;
    if (!welcome || !video || !this.encoder || this.paused || this.encoding) return;
    // Never more frames in flight than the edge allows: skip this tick instead.
    if (this.inflight.size >= welcome.max_inflight) {
      this.counts.heldBack += 1;
      return;
    }
    if (video.readyState < 2 || video.videoWidth === 0) return;
    this.encoding = true;
    try {
      // Main-thread time: the synchronous parts on either side of the encode.
      let t = performance.now();
      const pending = createImageBitmap(video);
      let main = performance.now() - t;
      const bitmap = await pending;
      let encoded: { jpeg: ArrayBuffer; ms: number };
      try {
        encoded = await this.encoder(bitmap, this.quality);
      } catch (err) {
        const why = err instanceof Error ? err.message : String(err);
        if (this.encoder.offMainThread) {
          // The worker failed: go on with the main thread's canvas.
          this.encoder = canvasEncoder();
          this.emit("capture", { state: "encoder_failed", detail: `${why}; encoding on the main thread now` });
        } else {
          this.report("encoder_failed", why);
        }
        return;
      }
      this.clear("encoder_failed");
      const jpeg = new Uint8Array(encoded.jpeg);
      if (jpeg.byteLength > welcome.max_frame_bytes) {
        this.quality = Math.max(0.3, this.quality - 0.1);
        return;
      }
      t = performance.now();
      const seq = ++this.seq;
      this.inflight.add(seq);
      const captured_at_ms = Date.now();
      if (this.json) {
        this.send({ type: "frame", seq, captured_at_ms, jpeg_b64: base64(jpeg) });
      } else {
        this.send({ type: "frame", seq, captured_at_ms, jpeg });
      }
      main += performance.now() - t;
      this.counts.sent += 1;
      push(this.encodeMs, encoded.ms);
      push(this.mainMs, this.encoder.offMainThread ? main : main + encoded.ms);
    } finally {
      this.encoding = false;
    }
  }
}
