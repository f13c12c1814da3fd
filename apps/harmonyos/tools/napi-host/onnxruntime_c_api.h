// A minimal stand-in for ONNX Runtime's onnxruntime_c_api.h, declaring only what
// apps/harmonyos/entry/src/main/cpp/ort_engine.cpp uses, so the NAPI module compiles and runs on
// Linux in CI (tools/build-napi-host.mjs) against onnxruntime-node's libonnxruntime.so.1, whose
// npm package ships no headers. A real build (DevEco Studio, CMakeLists.txt) uses ORT's full
// header instead, from third_party/onnxruntime/include; this file is never on that include path.
//
// Where the facts come from: ORT's include/onnxruntime/core/session/onnxruntime_c_api.h of
// ONNX Runtime 1.29.0 (ORT_API_VERSION 29; the copy github.com/yalue/onnxruntime_go vendors at its
// "upgrade to ORT 1.29.0" commit b4e0f0b, microsoft/onnxruntime itself being too large to fetch
// here). The member indices of `struct OrtApi` below were read off that header twice, by
// offsetof() on the real struct and by counting its member declarations with a script (425
// members at version 29; both agree), as were the signatures and enum values. OrtApi only ever
// grows at its end, so the indices hold for every later version. ORT_API_VERSION is 31 because
// onnxruntime-node 1.31.1's library reports "1.31.1" and serves API versions 1..31 (GetApi(32)
// returns NULL).
//
// The struct is a prefix of the real one: the members used are at their true indices, the
// others are `void*` gaps; it is only ever reached through the pointer GetApi() returns, never
// allocated or copied here. The static_asserts pin every used member to its index.
#ifndef MINICPMV_EDGE_ORT_C_API_SUBSET_H_
#define MINICPMV_EDGE_ORT_C_API_SUBSET_H_

#include <stddef.h>
#include <stdint.h>

#define ORT_API_VERSION 31

#ifdef __cplusplus
#define ORT_SUBSET_NOEXCEPT noexcept
extern "C" {
#else
#define ORT_SUBSET_NOEXCEPT
#endif

typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
} ONNXTensorElementDataType;

typedef enum OrtLoggingLevel {
  ORT_LOGGING_LEVEL_WARNING = 2,
} OrtLoggingLevel;

typedef enum GraphOptimizationLevel {
  ORT_ENABLE_ALL = 99,
} GraphOptimizationLevel;

typedef enum ExecutionMode {
  ORT_SEQUENTIAL = 0,
} ExecutionMode;

typedef enum OrtAllocatorType {
  OrtArenaAllocator = 1,
} OrtAllocatorType;

typedef enum OrtMemType {
  OrtMemTypeDefault = 0,
} OrtMemType;

// Opaque handles.
typedef struct OrtEnv OrtEnv;
typedef struct OrtStatus OrtStatus;
typedef struct OrtMemoryInfo OrtMemoryInfo;
typedef struct OrtSession OrtSession;
typedef struct OrtValue OrtValue;
typedef struct OrtRunOptions OrtRunOptions;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtAllocator OrtAllocator;  // only passed back to ORT here, so left opaque

typedef OrtStatus* OrtStatusPtr;

#define ORT_SUBSET_STATUS(NAME, ...) OrtStatusPtr (*NAME)(__VA_ARGS__) ORT_SUBSET_NOEXCEPT
#define ORT_SUBSET_RELEASE(X) void (*Release##X)(Ort##X * input) ORT_SUBSET_NOEXCEPT

typedef struct OrtApi {
  void* _gap0[2];                                                                     // 0-1
  const char* (*GetErrorMessage)(const OrtStatus* status) ORT_SUBSET_NOEXCEPT;        // 2
  ORT_SUBSET_STATUS(CreateEnv, OrtLoggingLevel log_severity_level, const char* logid,
                    OrtEnv** out);                                                    // 3
  void* _gap4[3];                                                                     // 4-6
  ORT_SUBSET_STATUS(CreateSession, const OrtEnv* env, const char* model_path,
                    const OrtSessionOptions* options, OrtSession** out);              // 7
  void* _gap8[1];                                                                     // 8
  ORT_SUBSET_STATUS(Run, OrtSession* session, const OrtRunOptions* run_options,
                    const char* const* input_names, const OrtValue* const* inputs, size_t input_len,
                    const char* const* output_names, size_t output_names_len,
                    OrtValue** outputs);                                              // 9
  ORT_SUBSET_STATUS(CreateSessionOptions, OrtSessionOptions** options);               // 10
  void* _gap11[2];                                                                    // 11-12
  ORT_SUBSET_STATUS(SetSessionExecutionMode, OrtSessionOptions* options,
                    ExecutionMode execution_mode);                                    // 13
  void* _gap14[9];                                                                    // 14-22
  ORT_SUBSET_STATUS(SetSessionGraphOptimizationLevel, OrtSessionOptions* options,
                    GraphOptimizationLevel graph_optimization_level);                 // 23
  ORT_SUBSET_STATUS(SetIntraOpNumThreads, OrtSessionOptions* options, int intra_op_num_threads);  // 24
  ORT_SUBSET_STATUS(SetInterOpNumThreads, OrtSessionOptions* options, int inter_op_num_threads);  // 25
  void* _gap26[5];                                                                    // 26-30
  ORT_SUBSET_STATUS(SessionGetOutputCount, const OrtSession* session, size_t* out);  // 31
  void* _gap32[5];                                                                    // 32-36
  ORT_SUBSET_STATUS(SessionGetOutputName, const OrtSession* session, size_t index, OrtAllocator* allocator,
                    char** value);                                                    // 37
  void* _gap38[11];                                                                   // 38-48
  ORT_SUBSET_STATUS(CreateTensorWithDataAsOrtValue, const OrtMemoryInfo* info, void* p_data, size_t p_data_len,
                    const int64_t* shape, size_t shape_len, ONNXTensorElementDataType type,
                    OrtValue** out);                                                  // 49
  void* _gap50[1];                                                                    // 50
  ORT_SUBSET_STATUS(GetTensorMutableData, OrtValue* value, void** out);               // 51
  void* _gap52[8];                                                                    // 52-59
  ORT_SUBSET_STATUS(GetTensorElementType, const OrtTensorTypeAndShapeInfo* info,
                    ONNXTensorElementDataType* out);                                  // 60
  ORT_SUBSET_STATUS(GetDimensionsCount, const OrtTensorTypeAndShapeInfo* info, size_t* out);  // 61
  ORT_SUBSET_STATUS(GetDimensions, const OrtTensorTypeAndShapeInfo* info, int64_t* dim_values,
                    size_t dim_values_length);                                        // 62
  void* _gap63[1];                                                                    // 63
  ORT_SUBSET_STATUS(GetTensorShapeElementCount, const OrtTensorTypeAndShapeInfo* info, size_t* out);  // 64
  ORT_SUBSET_STATUS(GetTensorTypeAndShape, const OrtValue* value, OrtTensorTypeAndShapeInfo** out);  // 65
  void* _gap66[3];                                                                    // 66-68
  ORT_SUBSET_STATUS(CreateCpuMemoryInfo, OrtAllocatorType type, OrtMemType mem_type,
                    OrtMemoryInfo** out);                                             // 69
  void* _gap70[6];                                                                    // 70-75
  ORT_SUBSET_STATUS(AllocatorFree, OrtAllocator* ort_allocator, void* p);             // 76
  void* _gap77[1];                                                                    // 77
  ORT_SUBSET_STATUS(GetAllocatorWithDefaultOptions, OrtAllocator** out);              // 78
  void* _gap79[13];                                                                   // 79-91
  ORT_SUBSET_RELEASE(Env);                                                            // 92
  ORT_SUBSET_RELEASE(Status);                                                         // 93
  ORT_SUBSET_RELEASE(MemoryInfo);                                                     // 94
  ORT_SUBSET_RELEASE(Session);                                                        // 95
  ORT_SUBSET_RELEASE(Value);                                                          // 96
  void* _gap97[2];                                                                    // 97-98
  ORT_SUBSET_RELEASE(TensorTypeAndShapeInfo);                                         // 99
  ORT_SUBSET_RELEASE(SessionOptions);                                                 // 100
  void* _gap101[29];                                                                  // 101-129
  ORT_SUBSET_STATUS(AddSessionConfigEntry, OrtSessionOptions* options, const char* config_key,
                    const char* config_value);                                        // 130
  // ... the real struct goes on (425 members at version 29); nothing after here is used.
} OrtApi;

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version) ORT_SUBSET_NOEXCEPT;  // NULL when the library lacks `version`
  const char* (*GetVersionString)(void) ORT_SUBSET_NOEXCEPT;
} OrtApiBase;

const OrtApiBase* OrtGetApiBase(void) ORT_SUBSET_NOEXCEPT;

#ifdef __cplusplus
}  // extern "C"
#define ORT_SUBSET_ASSERT(member, index) \
  static_assert(offsetof(OrtApi, member) == (index) * sizeof(void*), "OrtApi::" #member " is not at index " #index)
#else
#define ORT_SUBSET_ASSERT(member, index) \
  _Static_assert(offsetof(OrtApi, member) == (index) * sizeof(void*), "OrtApi::" #member " is not at index " #index)
#endif

ORT_SUBSET_ASSERT(GetErrorMessage, 2);
ORT_SUBSET_ASSERT(CreateEnv, 3);
ORT_SUBSET_ASSERT(CreateSession, 7);
ORT_SUBSET_ASSERT(Run, 9);
ORT_SUBSET_ASSERT(CreateSessionOptions, 10);
ORT_SUBSET_ASSERT(SetSessionExecutionMode, 13);
ORT_SUBSET_ASSERT(SetSessionGraphOptimizationLevel, 23);
ORT_SUBSET_ASSERT(SetIntraOpNumThreads, 24);
ORT_SUBSET_ASSERT(SetInterOpNumThreads, 25);
ORT_SUBSET_ASSERT(SessionGetOutputCount, 31);
ORT_SUBSET_ASSERT(SessionGetOutputName, 37);
ORT_SUBSET_ASSERT(CreateTensorWithDataAsOrtValue, 49);
ORT_SUBSET_ASSERT(GetTensorMutableData, 51);
ORT_SUBSET_ASSERT(GetTensorElementType, 60);
ORT_SUBSET_ASSERT(GetDimensionsCount, 61);
ORT_SUBSET_ASSERT(GetDimensions, 62);
ORT_SUBSET_ASSERT(GetTensorShapeElementCount, 64);
ORT_SUBSET_ASSERT(GetTensorTypeAndShape, 65);
ORT_SUBSET_ASSERT(CreateCpuMemoryInfo, 69);
ORT_SUBSET_ASSERT(AllocatorFree, 76);
ORT_SUBSET_ASSERT(GetAllocatorWithDefaultOptions, 78);
ORT_SUBSET_ASSERT(ReleaseEnv, 92);
ORT_SUBSET_ASSERT(ReleaseStatus, 93);
ORT_SUBSET_ASSERT(ReleaseMemoryInfo, 94);
ORT_SUBSET_ASSERT(ReleaseSession, 95);
ORT_SUBSET_ASSERT(ReleaseValue, 96);
ORT_SUBSET_ASSERT(ReleaseTensorTypeAndShapeInfo, 99);
ORT_SUBSET_ASSERT(ReleaseSessionOptions, 100);
ORT_SUBSET_ASSERT(AddSessionConfigEntry, 130);

#undef ORT_SUBSET_ASSERT
#undef ORT_SUBSET_STATUS
#undef ORT_SUBSET_RELEASE

#endif  // MINICPMV_EDGE_ORT_C_API_SUBSET_H_
