// The candidate page: the camera preview, the live verdict, what the policy did, and the
// liveness challenges the edge asks for.

import {
  VigilClient,
  type ActionMsg,
  type ChallengeEvent,
  type ChallengeProgressMsg,
  type ChallengeResultMsg,
  type StateChange,
} from "./sdk";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const form = $<HTMLFormElement>("signin");
const clientId = $<HTMLInputElement>("client-id");
const token = $<HTMLInputElement>("token");
const preview = $<HTMLVideoElement>("preview");
const verdict = $("verdict");
const verdictWhy = $("verdict-why");
const action = $("action");
const status = $("status");
const banner = $("banner");
const lock = $("lock");
const lockReason = $("lock-reason");
const ended = $("ended");
const endedTitle = $("ended-title");
const endedDetail = $("ended-detail");
const signedOut = $("signed-out");
const signedOutWhy = $("signed-out-why");
const challenge = $("challenge");
const challengeStep = $("challenge-step");
const challengeWhy = $("challenge-why");
const challengeText = $("challenge-text");
const challengeThen = $("challenge-then");
const challengeSeconds = $("challenge-seconds");
const challengeBar = $("challenge-bar");

const params = new URLSearchParams(location.search);
clientId.value = params.get("client") ?? "";
// An exam platform opens this page with a short-lived session token in the URL fragment
// (`#client=ID&token=...`, minted by its back end with POST /v1/admin/sessions), so the
// client's permanent token never reaches the browser. A fragment is not sent to any server nor
// in a Referer header; it leaves the address bar and the history at once.
const fragment = new URLSearchParams(location.hash.slice(1));
const handedToken = fragment.get("token");
if (handedToken) {
  token.value = handedToken;
  // A session token is not a password to remember.
  token.autocomplete = "off";
  clientId.value = fragment.get("client") ?? clientId.value;
  history.replaceState(null, "", location.pathname + location.search);
}

const REASONS: Record<string, string> = {
  ok: "you are verified",
  no_face: "no face in view",
  multiple_faces: "more than one person in view",
  low_quality: "your face is hard to see: face the camera, add light",
  spoof: "this does not look like a live camera",
  wrong_person: "this is not the enrolled person",
  phone: "a phone is in view",
  no_frames: "the camera stopped sending",
  invalid_frame: "the camera's pictures cannot be read",
  admin: "an administrator",
};

function showAction(a: ActionMsg) {
  action.textContent = `${a.action} (${a.reason})`;
  const why = REASONS[a.reason] ?? a.reason;
  switch (a.action) {
    case "allow":
      banner.hidden = true;
      lock.hidden = true;
      break;
    case "warn":
      banner.textContent = `Warning: ${why}`;
      banner.hidden = false;
      break;
    case "lock_screen":
      lockReason.textContent = why;
      lock.hidden = false;
      break;
    case "sign_out":
      showSignedOut(`The session was ended: ${why}.`);
      client?.stop("signed_out", "sign_out");
      break;
  }
}

function showSignedOut(why?: string) {
  hideChallenge();
  if (why !== undefined) signedOutWhy.textContent = why;
  signedOut.hidden = false;
}

// Challenges. Directions are the candidate's own; the preview is mirrored (style.css), so the
// candidate's left is the screen's left, and the arrow points there.
const STEPS: Record<string, [text: string, direction: "left" | "right"]> = {
  turn_left: ["Turn your head to your left", "left"],
  turn_right: ["Turn your head to your right", "right"],
};
const CHALLENGE_WHY: Record<string, string> = {
  start: "A quick check that you are live.",
  suspicion: "Your camera looks like a photo or a screen.",
  operator: "Your proctor asked for a check.",
  random: "A routine check.",
  retry: "One more try.",
};
const CHALLENGE_FAILED: Record<string, string> = {
  timeout: "Time ran out.",
};

let shown: (ChallengeEvent & { done: number }) | undefined;
let tick: ReturnType<typeof setInterval> | undefined;
let hideTimer: ReturnType<typeof setTimeout> | undefined;

/** A new challenge replaces the one shown; the same one again (after a reconnect) keeps its
 * progress and takes the new deadline. */
function showChallenge(c: ChallengeEvent) {
  shown = { ...c, done: shown?.id === c.id ? shown.done : 0 };
  clearTimeout(hideTimer);
  challenge.dataset.state = "active";
  challenge.dataset.reason = c.reason;
  challengeWhy.textContent = CHALLENGE_WHY[c.reason] ?? "";
  showStep();
  clearInterval(tick);
  tick = setInterval(countdown, 250);
  countdown();
  challenge.hidden = false;
}

function showStep() {
  if (!shown) return;
  const n = shown.steps.length;
  const step = shown.steps[shown.done];
  // Instruction changes are announced (the element is an assertive live region); the countdown
  // is hidden from screen readers, so it is not read out every second.
  if (!step) {
    challengeStep.textContent = n ? `Step ${n} of ${n}` : "";
    challengeText.textContent = "Now look at the camera";
    challengeThen.textContent = "";
    delete challenge.dataset.direction;
    return;
  }
  const [text, direction] = STEPS[step.kind] ?? [String(step.kind).replace(/_/g, " "), undefined];
  challengeStep.textContent = `Step ${shown.done + 1} of ${n}`;
  challengeText.textContent = text;
  challengeThen.textContent = "then face the camera again";
  if (direction) challenge.dataset.direction = direction;
  else delete challenge.dataset.direction;
}

function countdown() {
  if (!shown) return;
  const left = Math.max(0, shown.expiresAt - Date.now());
  challengeSeconds.textContent = `${Math.ceil(left / 1000)} s`;
  challengeBar.style.width = `${(100 * left) / Math.max(1, shown.deadline_ms)}%`;
  challenge.toggleAttribute("data-urgent", left <= 3000);
  if (left === 0) clearInterval(tick);
}

function challengeProgress(p: ChallengeProgressMsg) {
  if (shown?.id !== p.id || challenge.dataset.state !== "active") return;
  shown.done = p.done;
  showStep();
}

function challengeResult(r: ChallengeResultMsg) {
  if (shown && shown.id !== r.id) return;
  clearInterval(tick);
  shown = undefined;
  delete challenge.dataset.direction;
  challenge.removeAttribute("data-urgent");
  challenge.dataset.state = r.passed ? "passed" : "failed";
  challengeStep.textContent = "";
  challengeWhy.textContent = "";
  challengeText.textContent = r.passed ? "Thank you" : "Check not passed";
  challengeThen.textContent = r.passed ? "" : (CHALLENGE_FAILED[r.reason] ?? r.reason.replace(/_/g, " "));
  challenge.hidden = false;
  clearTimeout(hideTimer);
  hideTimer = setTimeout(hideChallenge, r.passed ? 1500 : 4000);
}

function hideChallenge() {
  clearInterval(tick);
  clearTimeout(hideTimer);
  shown = undefined;
  challenge.hidden = true;
}

function end(title: string, detail: string) {
  endedTitle.textContent = title;
  endedDetail.textContent = detail;
  ended.hidden = false;
}

const CAPTURE: Record<string, string> = {
  camera_lost: "the camera stopped; plug it back in or close the app that took it",
  encoder_failed: "this browser could not encode the camera's picture",
  hidden: "bring this tab back to the front",
};

function showState(s: StateChange) {
  const words: Record<string, string> = {
    connecting: "connecting",
    streaming: "streaming",
    paused: "paused by an administrator",
    interrupted: `not capturing: ${CAPTURE[s.detail ?? ""] ?? s.detail ?? ""}`,
    reconnecting: `reconnecting${s.retryInMs !== undefined ? ` in ${(s.retryInMs / 1000).toFixed(1)} s` : ""}`,
    stopped: "stopped",
    replaced: "replaced by a newer session",
    blocked: "blocked",
    unauthorized: "unknown client or wrong token",
    kicked: "disconnected by an administrator",
    refused: "refused",
    signed_out: "signed out",
  };
  status.textContent = words[s.state] ?? s.state;
  status.dataset.state = s.state;
  if (s.state === "blocked") end("Blocked", "An administrator blocked this client. Contact your proctor.");
  if (s.state === "replaced") end("Session moved", "This client was opened somewhere else.");
  if (s.state === "unauthorized") form.hidden = false;
  if (s.state === "signed_out") showSignedOut();
  else if (!["connecting", "streaming", "paused", "interrupted", "reconnecting"].includes(s.state)) hideChallenge();
}

$("signed-out-again").addEventListener("click", () => {
  signedOut.hidden = true;
  form.hidden = false;
});

let client: VigilClient | undefined;

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  client?.stop();
  ended.hidden = true;
  signedOut.hidden = true;
  hideChallenge();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  client = new VigilClient({
    url: `${scheme}://${location.host}/v1/stream`,
    clientId: clientId.value.trim(),
    token: token.value.trim(),
    preview,
    fps: Number(params.get("fps") ?? 5),
    workerUrl: new URL("encoder.js", location.href),
  });
  client.on("result", (r) => {
    const v = r.analysis.kind === "identity" ? r.analysis.verdict : undefined;
    verdict.textContent = v ?? r.analysis.kind;
    verdict.dataset.verdict = v ?? "";
    verdictWhy.textContent = v ? `(${REASONS[v] ?? ""})` : "";
  });
  client.on("action", showAction);
  client.on("challenge", showChallenge);
  client.on("challenge_progress", challengeProgress);
  client.on("challenge_result", challengeResult);
  // For benchmarks and support: the client's own measurements.
  (window as unknown as { vigil: VigilClient }).vigil = client;
  client.on("state", showState);
  client.on("error", (m) => (status.title = `${m.code}: ${m.message}`));
  form.hidden = true;
  try {
    await client.start();
  } catch (err) {
    form.hidden = false;
    status.textContent = `camera: ${(err as Error).message}`;
  }
});
