import XCTest

@testable import MiniCPMVCore

/// An engine that replays the kit's recorded logits: prefill returns row 0, the k-th decode step
/// row k. It records what the loop asked of it (slices, embedding ids, chunk calls) so the test can
/// check the loop drove it as the reference runtime did. Its features and embeddings are zeros:
/// the logits do not depend on them here.
final class ReplayEngine: Engine {
    final class State: DecoderState {
        var prefillCalls: [(nValid: Int, startPos: Int)] = []
        var decodePositions: [Int] = []
    }

    let info: ModelInfo
    let rows: [[Float]]
    var visionCalls: [(patches: [Float], positions: [Int64], mode: DownsampleMode)] = []
    var embeddingCalls: [[Int]] = []
    var states: [State] = []

    init(info: ModelInfo, logits: [Float], steps: Int) {
        self.info = info
        let v = info.vocabSize
        rows = (0..<steps).map { Array(logits[($0 * v)..<(($0 + 1) * v)]) }
    }

    func visionEncoder(patches: [Float], positionIds: [Int64], mode: DownsampleMode) async throws -> [Float] {
        visionCalls.append((patches, positionIds, mode))
        return [Float](repeating: 0, count: positionIds.count / mode.tokenDivisor * info.hiddenSize)
    }

    func tokenEmbedding(_ ids: [Int]) async throws -> [Float] {
        embeddingCalls.append(ids)
        return [Float](repeating: 0, count: ids.count * info.hiddenSize)
    }

    func newState() throws -> DecoderState {
        let s = State()
        states.append(s)
        return s
    }

    func prefillChunk(embeds: [Float], nValid: Int, startPos: Int, state: DecoderState) async throws -> [Float] {
        let s = try XCTUnwrap(state as? State)
        XCTAssertEqual(embeds.count, info.chunkSize * info.hiddenSize, "a prefill chunk is always chunk rows")
        s.prefillCalls.append((nValid, startPos))
        return rows[0]
    }

    func decodeStep(embed: [Float], pos: Int, state: DecoderState) async throws -> [Float] {
        let s = try XCTUnwrap(state as? State)
        XCTAssertEqual(embed.count, info.hiddenSize)
        s.decodePositions.append(pos)
        guard s.decodePositions.count < rows.count else {
            throw CoreError.invalid("the loop asked for step \(s.decodePositions.count) of a \(rows.count)-row replay")
        }
        return rows[s.decodePositions.count]
    }
}

final class GenerationTests: XCTestCase {
    /// Every greedy run, replayed through the whole chat turn: prompt from the question and the image,
    /// one vision call per slice with the kit's patches, chunked prefill, decode, sampling, stop rule,
    /// streaming.
    func testEveryGreedyRunReplayed() async throws {
        let kit = try Kit.load()
        let runs = try kit.index.objects("generations")
        XCTAssertGreaterThan(runs.count, 0)
        let texts = BundleTexts(
            tokenizerJSON: try XCTUnwrap(try kit.asset("tokenizer.json")),
            tokenizerConfigJSON: try kit.asset("tokenizer_config.json"),
            generationConfigJSON: try kit.asset("generation_config.json"),
            chatTemplate: try XCTUnwrap(try kit.asset("chat_template.jinja")))
        let stopIds = try kit.index.ints("stop_ids")
        var steps = 0
        for run in runs {
            let name = try run.string("name")
            let ref = try kit.ref(run, "logits")
            let engine = ReplayEngine(info: try kit.model, logits: try kit.f32(ref), steps: ref.shape[0])
            XCTAssertEqual(ref.shape[1], try kit.model.vocabSize)
            let session = try ChatSession(
                engine: engine, texts: texts, sliceConfig: try kit.sliceConfig, stopIds: stopIds)
            var options = AskOptions()
            options.sampling.maxNewTokens = try run.int("max_new_tokens")
            options.recordLogits = true
            var images = [ImagePixels]()
            var image: JSONObject?
            if run.has("image") {
                let img = try run.object("image")
                image = img
                images.append(try kit.pixels(img))
                options.downsampleMode = try DownsampleMode(parsing: img.string("downsample_mode"))
                options.maxSliceNums = try img.int("max_slice_nums")
            }
            var streamed = [String]()
            let stats = try await session.ask(try run.string("question"), images: images, options: options) {
                streamed.append($0)
            }

            let tokenIds = try run.ints("token_ids")
            XCTAssertEqual(stats.promptIds, try run.ints("prompt_ids"), "\(name): prompt ids")
            XCTAssertEqual(stats.tokenIds, tokenIds, "\(name): greedy tokens")
            XCTAssertEqual(stats.stopReason.rawValue, try run.string("stop_reason"), "\(name): stop reason")
            XCTAssertEqual(stats.text, try run.string("text"), "\(name): text")
            XCTAssertEqual(stats.logits.count, ref.shape[0], "\(name): every recorded row was used, none more")

            // the stream: the decoder fed the run's tokens gives the kit's pieces, and the UI saw them in order
            let stream = try run.object("stream")
            var decoder = StreamDecoder(tokenizer: session.tokenizer)
            XCTAssertEqual(tokenIds.map { decoder.push($0) }, try stream.strings("pieces"), "\(name): stream pieces")
            XCTAssertEqual(decoder.flush(), try stream.string("flush"), "\(name): stream flush")
            XCTAssertEqual(streamed.joined(), try stream.string("decoded"), "\(name): streamed text")
            XCTAssertEqual(
                streamed, (try stream.strings("pieces") + [try stream.string("flush")]).filter { !$0.isEmpty })

            // how the loop drove the engine
            let state = try XCTUnwrap(engine.states.first)
            XCTAssertEqual(engine.states.count, 1, "one decoder state per turn")
            let nPrompt = stats.promptIds.count
            let chunk = try kit.model.chunkSize
            XCTAssertEqual(state.prefillCalls.map(\.startPos), Array(stride(from: 0, to: nPrompt, by: chunk)))
            XCTAssertEqual(state.prefillCalls.map(\.nValid).reduce(0, +), nPrompt)
            XCTAssertEqual(state.decodePositions, Array(nPrompt..<(nPrompt + state.decodePositions.count)))
            XCTAssertEqual(engine.embeddingCalls.first, stats.promptIds, "the prompt is embedded first")
            XCTAssertEqual(
                Array(engine.embeddingCalls.dropFirst()),
                tokenIds.dropLast(stats.stopReason == .stopToken ? 0 : 1).map { [$0] })
            if stats.stopReason == .stopToken {
                XCTAssertEqual(try run.int("stop_token_id"), SamplingMath.greedy(engine.rows.last!))
            }
            if let image {
                let slices = try image.objects("slices")
                XCTAssertEqual(engine.visionCalls.count, slices.count, "\(name): one vision call per slice")
                for (i, s) in slices.enumerated() where i < engine.visionCalls.count {
                    let pr = try kit.ref(s, "patches")
                    XCTAssertLessThanOrEqual(maxAbsDiff(engine.visionCalls[i].patches, try kit.f32(pr)), pr.atol)
                    XCTAssertEqual(engine.visionCalls[i].positions, try kit.i64(kit.ref(s, "position_ids")))
                }
            }
            steps += ref.shape[0]
        }
        print("[ios-core] generations: \(runs.count) greedy runs, \(steps) logits rows replayed")
    }

    /// The same replay on the rows alone: greedy on each row gives the tokens, then the stop token.
    func testGreedyOnEveryRecordedRow() throws {
        let kit = try Kit.load()
        let stopIds = Set(try kit.index.ints("stop_ids"))
        for run in try kit.index.objects("generations") {
            let ref = try kit.ref(run, "logits")
            let engine = ReplayEngine(info: try kit.model, logits: try kit.f32(ref), steps: ref.shape[0])
            let tokens = try run.ints("token_ids")
            let picked = engine.rows.map { SamplingMath.greedy($0) }
            XCTAssertEqual(Array(picked.prefix(tokens.count)), tokens)
            if try run.string("stop_reason") == "stop_token" {
                XCTAssertEqual(picked.count, tokens.count + 1)
                XCTAssertTrue(stopIds.contains(picked.last!))
            } else {
                XCTAssertEqual(picked.count, tokens.count)
                XCTAssertEqual(tokens.count, try run.int("max_new_tokens"))
            }
        }
    }

    /// The loop stops at max_new_tokens, refuses an overlong context, and a timing run ignores stops.
    func testLimitsAndContext() async throws {
        let info = ModelInfo(
            family: "t", hiddenSize: 2, vocabSize: 3, maxContext: 8, chunkSize: 4, patchSize: 14, imageTokenId: 2,
            videoTokenId: 2)
        let rows: [Float] = [0, 9, 0, 9, 0, 0, 0, 9, 0, 9, 0, 0]  // argmax 1, 0, 1, 0
        let engine = ReplayEngine(info: info, logits: rows, steps: 4)
        var sampler = try Sampler(config: SamplingConfig())
        let r = try await Generator.generate(
            engine, embeds: [Float](repeating: 0, count: 10), sampler: &sampler,
            limits: GenerationLimits(maxNewTokens: 3, stopIds: [])
        )
        XCTAssertEqual(r.tokenIds, [1, 0, 1])
        XCTAssertEqual(r.stopReason, .maxNewTokens)
        XCTAssertEqual(r.stepMs.count, 2)
        var s2 = try Sampler(config: SamplingConfig())
        let stopped = try await Generator.generate(
            ReplayEngine(info: info, logits: rows, steps: 4), embeds: [Float](repeating: 0, count: 10), sampler: &s2,
            limits: GenerationLimits(maxNewTokens: 3, stopIds: [0]))
        XCTAssertEqual(stopped.tokenIds, [1])
        XCTAssertEqual(stopped.stopTokenId, 0)
        var s3 = try Sampler(config: SamplingConfig())
        do {
            _ = try await Generator.generate(
                engine, embeds: [Float](repeating: 0, count: 10), sampler: &s3,
                limits: GenerationLimits(maxNewTokens: 4, stopIds: []))
            XCTFail("5 + 4 tokens exceed a context of 8")
        } catch {
            XCTAssertTrue("\(error)".contains("context overflow"), "\(error)")
        }
    }

    func testDeviceReport() throws {
        var stats = ChatStats()
        stats.ttftMs = 900
        stats.decodeTokS = 20
        stats.decodeTokens = 64
        var report = DeviceReport(
            family: "minicpm-v-4.6", format: "coreml", quantization: "int4", manifestSha256: "abc",
            facts: .init(device: "iPhone17,2", osVersion: "18.3", appVersion: "0.1.0"),
            settings: .init(
                image: "wide.png", width: 1000, height: 600, downsampleMode: .x16, maxSliceNums: 9, decodeTokens: 64))
        XCTAssertThrowsError(try report.json())
        try report.addRun(stats, imageDecodeMs: 12.5, peakMemoryMB: 1200)
        let parsed = try JSONObject.parse(try report.json(), "report")
        XCTAssertEqual(try parsed.string("platform"), "ios")
        XCTAssertEqual(try parsed.object("bundle").string("format"), "coreml")
        let run = try XCTUnwrap(try parsed.objects("runs").first)
        XCTAssertEqual(try run.double("ttft_ms"), 912.5)
        XCTAssertEqual(try run.double("decode_tok_s"), 20)
        XCTAssertThrowsError(try report.addRun(ChatStats(), imageDecodeMs: 0))
        // tests/test_ios_core.py hands the report to `bench --device-report`'s checker
        if let out = ProcessInfo.processInfo.environment["OUT_DIR"] {
            try report.addRun(stats, imageDecodeMs: 10)
            try report.json().write(
                to: URL(fileURLWithPath: out).appendingPathComponent("device-report.json"), atomically: true,
                encoding: .utf8)
        }
    }
}
