// The SDK's JPEG encoder, off the main thread: an ImageBitmap in, JPEG bytes out, or an error
// the page hears about (never silence).

const scope = self as unknown as DedicatedWorkerGlobalScope;
let canvas: OffscreenCanvas | undefined;

scope.onmessage = async (e: MessageEvent<{ id: number; frame: ImageBitmap; quality: number }>) => {
  const { id, frame, quality } = e.data;
  const started = performance.now();
  try {
    if (!canvas || canvas.width !== frame.width || canvas.height !== frame.height) {
      canvas = new OffscreenCanvas(frame.width, frame.height);
    }
    const ctx = canvas.getContext("2d");
    if (!ctx) throw new Error("no 2d context in the worker");
    ctx.drawImage(frame, 0, 0);
    const blob = await canvas.convertToBlob({ type: "image/jpeg", quality });
    const jpeg = await blob.arrayBuffer();
    scope.postMessage({ id, jpeg, ms: performance.now() - started }, [jpeg]);
  } catch (err) {
    scope.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  } finally {
    frame.close();
  }
};
