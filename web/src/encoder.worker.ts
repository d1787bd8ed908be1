// The SDK's JPEG encoder, off the main thread: an ImageBitmap in, JPEG bytes out.

const scope = self as unknown as DedicatedWorkerGlobalScope;
let canvas: OffscreenCanvas | undefined;

scope.onmessage = async (e: MessageEvent<{ id: number; frame: ImageBitmap; quality: number }>) => {
  const { id, frame, quality } = e.data;
  const started = performance.now();
  if (!canvas || canvas.width !== frame.width || canvas.height !== frame.height) {
    canvas = new OffscreenCanvas(frame.width, frame.height);
  }
  const ctx = canvas.getContext("2d");
  ctx?.drawImage(frame, 0, 0);
  frame.close();
  const blob = await canvas.convertToBlob({ type: "image/jpeg", quality });
  const jpeg = await blob.arrayBuffer();
  scope.postMessage({ id, jpeg, ms: performance.now() - started }, [jpeg]);
};
