// ArkTS view of libortengine.so (ort_engine.cpp).
export interface NativeTensor {
  name: string;
  dtype: string;
  dims: number[];
  data: ArrayBuffer;
}

export const createSession: (path: string, intraOpThreads: number) => bigint;
export const run: (handle: bigint, inputs: NativeTensor[]) => Promise<NativeTensor[]>;
export const releaseSession: (handle: bigint) => void;
