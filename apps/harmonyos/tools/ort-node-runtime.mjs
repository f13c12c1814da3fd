// OrtRuntime (entry/src/main/ets/engine/OrtEngine.ets) over onnxruntime-node: the Node stand-in for
// the app's NAPI module, so CI runs the app's own engine adapter against the real ONNX Runtime.
import ort from 'onnxruntime-node';
import { OrtTensor } from '../entry/src/main/ets/engine/OrtEngine.ets';

function toOrt(t) {
  return t.dtype === 'int64' ? new ort.Tensor('int64', t.i64, t.dims) : new ort.Tensor('float32', t.f32, t.dims);
}

function fromOrt(v) {
  if (v.type === 'int64') return OrtTensor.int64(v.data, [...v.dims]);
  if (v.type !== 'float32') throw new Error(`unsupported output type ${v.type}`);
  return OrtTensor.float32(v.data, [...v.dims]);
}

class NodeSession {
  constructor(session) {
    this.session = session;
  }

  async run(feeds) {
    const inputs = {};
    for (const [name, t] of feeds) inputs[name] = toOrt(t);
    const outs = await this.session.run(inputs);
    const result = new Map();
    for (const name of this.session.outputNames) result.set(name, fromOrt(outs[name]));
    return result;
  }

  release() {
    this.session.release();
  }
}

/** Session options as edge_runtime/backends/onnxruntime.py sets them. */
export const nodeOrtRuntime = {
  async open(path, intraOpThreads) {
    const session = await ort.InferenceSession.create(path, {
      executionProviders: ['cpu'],
      graphOptimizationLevel: 'all',
      intraOpNumThreads: intraOpThreads || 0,
      interOpNumThreads: 1,
      executionMode: 'sequential',
      logSeverityLevel: 3,
      extra: { session: { qdq_matmulnbits_accuracy_level: '1' } },
    });
    return new NodeSession(session);
  },
};
