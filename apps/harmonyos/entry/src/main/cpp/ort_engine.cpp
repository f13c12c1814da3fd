// libortengine.so: ONNX Runtime's C API behind a small NAPI surface, the on-device half of
// entry/src/main/ets/engine/NapiOrtRuntime.ets. It only opens sessions and runs them; every
// decision about feeds, state and the loop stays in ArkTS (OrtEngine.ets, core/Generator.ets),
// which CI runs on Node against onnxruntime-node. Runs execute on a worker thread (napi async
// work) so the UI thread never blocks on a decoder step.
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "napi/native_api.h"
#include "onnxruntime_c_api.h"

namespace {

// NULL when the library is older than the header (it serves API versions up to its own).
const OrtApi* Api() {
  static const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  return api;
}

OrtEnv* Env() {
  static OrtEnv* env = [] {
    OrtEnv* e = nullptr;
    if (Api() == nullptr) return static_cast<OrtEnv*>(nullptr);
    OrtStatus* st = Api()->CreateEnv(ORT_LOGGING_LEVEL_WARNING, "minicpmv-edge", &e);
    if (st != nullptr) {
      Api()->ReleaseStatus(st);
      return static_cast<OrtEnv*>(nullptr);
    }
    return e;
  }();
  return env;
}

// One status -> message; empty when ok. Releases the status.
std::string Take(OrtStatus* st) {
  if (st == nullptr) return std::string();
  std::string msg = Api()->GetErrorMessage(st);
  Api()->ReleaseStatus(st);
  return msg.empty() ? std::string("onnxruntime error") : msg;
}

void Throw(napi_env env, const std::string& msg) { napi_throw_error(env, nullptr, msg.c_str()); }

std::string GetString(napi_env env, napi_value v) {
  size_t len = 0;
  napi_get_value_string_utf8(env, v, nullptr, 0, &len);
  std::string s(len, '\0');
  napi_get_value_string_utf8(env, v, s.data(), len + 1, &len);
  return s;
}

struct Session {
  OrtSession* session = nullptr;
  std::vector<std::string> outputNames;
  int running = 0;        // runs queued or in flight; the session outlives them
  bool released = false;  // releaseSession was called; freed when the last run completes
};

// The handles JS holds: a handle is checked here before use, so a stale or forged one (a second
// releaseSession, a run after release) is a JS error instead of a use-after-free.
std::mutex liveMutex;
std::unordered_set<Session*> liveSessions;

void FreeSession(Session* s) {
  if (s->session != nullptr) Api()->ReleaseSession(s->session);
  delete s;
}

// A run is over (completed, or refused before it was queued): frees a released session after its last run.
void Unpin(Session* s) {
  std::lock_guard<std::mutex> lock(liveMutex);
  if (--s->running == 0 && s->released) FreeSession(s);
}

// One tensor copied out of JS before the worker runs (JS buffers must not be touched off-thread).
struct HostTensor {
  std::string name;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  std::vector<int64_t> dims;
  std::vector<uint8_t> bytes;
};

struct RunJob {
  Session* session = nullptr;
  std::vector<HostTensor> inputs;
  std::vector<HostTensor> outputs;
  std::string error;
  napi_deferred deferred = nullptr;
  napi_async_work work = nullptr;
};

size_t ElementSize(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? 8 : 4;
}

bool Supported(ONNXTensorElementDataType t) {
  return t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

std::string ApiMissing() {
  return std::string("onnxruntime ") + OrtGetApiBase()->GetVersionString() + " does not offer C API version " +
         std::to_string(ORT_API_VERSION) + " (the library is older than the header it was built with)";
}

// createSession(path: string, intraOpThreads: number): bigint (a handle; throws with ORT's message)
napi_value CreateSession(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  if (argc < 2) {
    Throw(env, "createSession(path, threads)");
    return nullptr;
  }
  if (Api() == nullptr || Env() == nullptr) {
    Throw(env, Api() == nullptr ? ApiMissing() : "onnxruntime environment failed to start");
    return nullptr;
  }
  std::string path = GetString(env, argv[0]);
  int32_t threads = 0;
  napi_get_value_int32(env, argv[1], &threads);

  const OrtApi* api = Api();
  OrtSessionOptions* opts = nullptr;
  std::string err = Take(api->CreateSessionOptions(&opts));
  // The Python runtime's settings (edge_runtime/backends/onnxruntime.py), so parity holds on device.
  if (err.empty()) err = Take(api->SetIntraOpNumThreads(opts, threads));
  if (err.empty()) err = Take(api->SetInterOpNumThreads(opts, 1));
  if (err.empty()) err = Take(api->SetSessionExecutionMode(opts, ORT_SEQUENTIAL));
  if (err.empty()) err = Take(api->SetSessionGraphOptimizationLevel(opts, ORT_ENABLE_ALL));
  if (err.empty()) err = Take(api->AddSessionConfigEntry(opts, "session.qdq_matmulnbits_accuracy_level", "1"));
  Session* s = new Session();
  if (err.empty()) err = Take(api->CreateSession(Env(), path.c_str(), opts, &s->session));
  if (opts != nullptr) api->ReleaseSessionOptions(opts);
  if (err.empty()) {
    OrtAllocator* alloc = nullptr;
    err = Take(api->GetAllocatorWithDefaultOptions(&alloc));
    size_t n = 0;
    if (err.empty()) err = Take(api->SessionGetOutputCount(s->session, &n));
    for (size_t i = 0; err.empty() && i < n; ++i) {
      char* name = nullptr;
      err = Take(api->SessionGetOutputName(s->session, i, alloc, &name));
      if (err.empty()) {
        s->outputNames.emplace_back(name);
        err = Take(api->AllocatorFree(alloc, name));
      }
    }
  }
  if (!err.empty()) {
    FreeSession(s);
    Throw(env, path + ": " + err);
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(liveMutex);
    liveSessions.insert(s);
  }
  napi_value handle;
  napi_create_bigint_uint64(env, reinterpret_cast<uint64_t>(s), &handle);
  return handle;
}

// The live session behind a handle, or nullptr (not a bigint, never created, or released).
// Callers hold liveMutex.
Session* SessionOf(napi_env env, napi_value v) {
  uint64_t raw = 0;
  bool lossless = false;
  if (napi_get_value_bigint_uint64(env, v, &raw, &lossless) != napi_ok || !lossless) return nullptr;
  Session* s = reinterpret_cast<Session*>(raw);
  return liveSessions.count(s) != 0 ? s : nullptr;
}

void ExecuteRun(napi_env /*env*/, void* data) {
  RunJob* job = static_cast<RunJob*>(data);
  const OrtApi* api = Api();
  OrtMemoryInfo* mem = nullptr;
  job->error = Take(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mem));
  std::vector<OrtValue*> in(job->inputs.size(), nullptr);
  std::vector<const char*> inNames;
  for (size_t i = 0; job->error.empty() && i < job->inputs.size(); ++i) {
    HostTensor& t = job->inputs[i];
    inNames.push_back(t.name.c_str());
    job->error = Take(api->CreateTensorWithDataAsOrtValue(mem, t.bytes.data(), t.bytes.size(), t.dims.data(),
                                                          t.dims.size(), t.type, &in[i]));
  }
  std::vector<const char*> outNames;
  for (const std::string& n : job->session->outputNames) outNames.push_back(n.c_str());
  std::vector<OrtValue*> out(outNames.size(), nullptr);
  if (job->error.empty()) {
    job->error = Take(api->Run(job->session->session, nullptr, inNames.data(), in.data(), in.size(),
                               outNames.data(), outNames.size(), out.data()));
  }
  for (size_t i = 0; job->error.empty() && i < out.size(); ++i) {
    OrtTensorTypeAndShapeInfo* shape = nullptr;
    job->error = Take(api->GetTensorTypeAndShape(out[i], &shape));
    HostTensor t;
    t.name = outNames[i];
    size_t ndim = 0;
    size_t count = 0;
    if (job->error.empty()) job->error = Take(api->GetTensorElementType(shape, &t.type));
    if (job->error.empty() && !Supported(t.type)) {
      job->error = "output " + t.name + " has ONNX element type " + std::to_string(static_cast<int>(t.type)) +
                   "; only float32 and int64 are supported";
    }
    if (job->error.empty()) job->error = Take(api->GetDimensionsCount(shape, &ndim));
    if (job->error.empty()) {
      t.dims.resize(ndim);
      job->error = Take(api->GetDimensions(shape, t.dims.data(), ndim));
    }
    if (job->error.empty()) job->error = Take(api->GetTensorShapeElementCount(shape, &count));
    if (shape != nullptr) api->ReleaseTensorTypeAndShapeInfo(shape);
    void* src = nullptr;
    if (job->error.empty()) job->error = Take(api->GetTensorMutableData(out[i], &src));
    if (job->error.empty()) {
      t.bytes.resize(count * ElementSize(t.type));
      std::memcpy(t.bytes.data(), src, t.bytes.size());
      job->outputs.push_back(std::move(t));
    }
  }
  for (OrtValue* v : in) if (v != nullptr) api->ReleaseValue(v);
  for (OrtValue* v : out) if (v != nullptr) api->ReleaseValue(v);
  if (mem != nullptr) api->ReleaseMemoryInfo(mem);
}

// Resolves with [{name, dtype, dims, data: ArrayBuffer}] in the session's output order.
void CompleteRun(napi_env env, napi_status /*status*/, void* data) {
  RunJob* job = static_cast<RunJob*>(data);
  if (!job->error.empty()) {
    napi_value msg;
    napi_value err;
    napi_create_string_utf8(env, job->error.c_str(), job->error.size(), &msg);
    napi_create_error(env, nullptr, msg, &err);
    napi_reject_deferred(env, job->deferred, err);
  } else {
    napi_value list;
    napi_create_array_with_length(env, job->outputs.size(), &list);
    for (size_t i = 0; i < job->outputs.size(); ++i) {
      HostTensor& t = job->outputs[i];
      napi_value obj, name, dtype, dims, buffer;
      void* dst = nullptr;
      napi_create_object(env, &obj);
      napi_create_string_utf8(env, t.name.c_str(), t.name.size(), &name);
      const char* typeName = t.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? "int64" : "float32";
      napi_create_string_utf8(env, typeName, std::strlen(typeName), &dtype);
      napi_create_array_with_length(env, t.dims.size(), &dims);
      for (size_t d = 0; d < t.dims.size(); ++d) {
        napi_value dim;
        napi_create_int64(env, t.dims[d], &dim);
        napi_set_element(env, dims, d, dim);
      }
      napi_create_arraybuffer(env, t.bytes.size(), &dst, &buffer);
      std::memcpy(dst, t.bytes.data(), t.bytes.size());
      napi_set_named_property(env, obj, "name", name);
      napi_set_named_property(env, obj, "dtype", dtype);
      napi_set_named_property(env, obj, "dims", dims);
      napi_set_named_property(env, obj, "data", buffer);
      napi_set_element(env, list, i, obj);
    }
    napi_resolve_deferred(env, job->deferred, list);
  }
  napi_delete_async_work(env, job->work);
  Unpin(job->session);
  delete job;
}

// run(handle: bigint, inputs: [{name, dtype, dims, data: ArrayBuffer}]): Promise<outputs>
napi_value Run(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  if (argc < 2) {
    Throw(env, "run(handle, inputs)");
    return nullptr;
  }
  Session* session = nullptr;
  {
    std::lock_guard<std::mutex> lock(liveMutex);
    session = SessionOf(env, argv[0]);
    if (session != nullptr) ++session->running;  // pinned until CompleteRun (or a refusal below)
  }
  if (session == nullptr) {
    Throw(env, "run: not a live session handle (released, or not from createSession)");
    return nullptr;
  }
  uint32_t n = 0;
  if (napi_get_array_length(env, argv[1], &n) != napi_ok) {
    Unpin(session);
    Throw(env, "run: inputs must be an array");
    return nullptr;
  }
  RunJob* job = new RunJob();
  job->session = session;
  for (uint32_t i = 0; i < n; ++i) {
    napi_value item, name, dtype, dims, data;
    napi_get_element(env, argv[1], i, &item);
    napi_get_named_property(env, item, "name", &name);
    napi_get_named_property(env, item, "dtype", &dtype);
    napi_get_named_property(env, item, "dims", &dims);
    napi_get_named_property(env, item, "data", &data);
    HostTensor t;
    t.name = GetString(env, name);
    const std::string type = GetString(env, dtype);
    if (type != "int64" && type != "float32") {
      delete job;
      Unpin(session);
      Throw(env, "run: input " + t.name + " has dtype '" + type + "'; only float32 and int64 are supported");
      return nullptr;
    }
    t.type = type == "int64" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    uint32_t ndim = 0;
    napi_get_array_length(env, dims, &ndim);
    for (uint32_t d = 0; d < ndim; ++d) {
      napi_value dim;
      int64_t value = 0;
      napi_get_element(env, dims, d, &dim);
      napi_get_value_int64(env, dim, &value);
      t.dims.push_back(value);
    }
    void* bytes = nullptr;
    size_t length = 0;
    if (napi_get_arraybuffer_info(env, data, &bytes, &length) != napi_ok) {
      delete job;
      Unpin(session);
      Throw(env, "run: input " + t.name + ": data is not an ArrayBuffer");
      return nullptr;
    }
    t.bytes.assign(static_cast<uint8_t*>(bytes), static_cast<uint8_t*>(bytes) + length);
    job->inputs.push_back(std::move(t));
  }
  napi_value promise;
  napi_value resource;
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_string_utf8(env, "ortengine.run", NAPI_AUTO_LENGTH, &resource);
  napi_create_async_work(env, nullptr, resource, ExecuteRun, CompleteRun, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

// releaseSession(handle: bigint): void
napi_value ReleaseSession(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  if (argc < 1) {
    Throw(env, "releaseSession(handle)");
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(liveMutex);
  Session* s = SessionOf(env, argv[0]);
  if (s == nullptr) {
    Throw(env, "releaseSession: not a live session handle (already released, or not from createSession)");
    return nullptr;
  }
  liveSessions.erase(s);
  s->released = true;
  if (s->running == 0) FreeSession(s);  // else the last CompleteRun frees it
  return nullptr;
}

napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor desc[] = {
      {"createSession", nullptr, CreateSession, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"run", nullptr, Run, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"releaseSession", nullptr, ReleaseSession, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, sizeof(desc) / sizeof(desc[0]), desc);
  return exports;
}

}  // namespace

static napi_module ortEngineModule = {
    1, 0, nullptr, Init, "ortengine", nullptr, {0},
};

extern "C" __attribute__((constructor)) void RegisterOrtEngine() { napi_module_register(&ortEngineModule); }
